"""``--reward-fn examples.extensions.reward:exact_match_or_half``: a custom reward.

A reward is ``fn(prompt: str, response: str, label) -> float``. With ``--reward-workers N``
(default 2) it runs in worker processes with a ``--reward-timeout``; ``0`` runs it in-process.
"""

from __future__ import annotations


def exact_match_or_half(prompt: str, response: str, label) -> float:
    """1 for the exact answer, 0.5 when the answer has the right number of digits, else 0."""
    answer = response.strip()
    if answer == str(label).strip():
        return 1.0
    return 0.5 if answer.isdigit() and len(answer) == len(str(label).strip()) else 0.0
