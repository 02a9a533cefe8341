"""A micro-batch's metric as ``(total, count, is_mean)``: summed over micro-batches and DP ranks, then read.

A mean whose count is 0 everywhere measured nothing (e.g. the rollout–trainer mismatch when
the engine returned no log-probs): it is left out of the step's row, never reported as 0 —
a 0 there would read as a perfect match. Sums (shares of the step loss) have no count;
a maximum (third entry ``MAX_KIND``) is reduced by max.
"""

from __future__ import annotations

import torch


def summed(total) -> torch.Tensor:
    """A share of a step total (its step value is Σ total)."""
    return torch.stack([torch.as_tensor(total, dtype=torch.float64), *torch.zeros(2, dtype=torch.float64)])


def averaged(total, count) -> torch.Tensor:
    """A mean's numerator and denominator (its step value is Σ total / Σ count, absent when Σ count = 0)."""
    return torch.stack(
        [
            torch.as_tensor(total, dtype=torch.float64),
            torch.as_tensor(count, dtype=torch.float64),
            torch.ones((), dtype=torch.float64),
        ]
    )


MAX_KIND = -1.0  # the third entry of a maximum (negative: reduced by max, not by sum)


def maximum(value) -> torch.Tensor:
    """A maximum over micro-batches and DP ranks (``None``: nothing measured here)."""
    v = float("-inf") if value is None else value
    return torch.stack(
        [
            torch.as_tensor(v, dtype=torch.float64),
            torch.as_tensor(0.0 if value is None else 1.0, dtype=torch.float64),
            torch.as_tensor(MAX_KIND, dtype=torch.float64),
        ]
    )


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` where ``mask`` is set."""
    m = mask.bool()
    return averaged(values.detach()[m].double().sum(), m.sum())


def read(total: float, count: float, is_mean: float) -> float | None:
    """The step value of a reduced metric; None when it is a mean that measured nothing."""
    if is_mean < 0:  # a maximum
        return total if count > 0 else None
    if not is_mean:
        return total
    return total / count if count > 0 else None
