"""``--data-source examples.extensions.data_source:doubling``: a custom prompt source.

A data source is ``fn(cfg: RunConfig, tokenizer) -> PromptSource`` where a PromptSource has
``take(start, count) -> list[Prompt]`` (position ``i`` of an endless, seed-determined stream:
resumed runs store the cursor) and ``eval_prompts() -> list[Prompt]`` (held out).
"""

from __future__ import annotations

import random

from megatron_mtp_rl.rollout.data import Prompt


class Doubling:
    """``a+a=`` → ``2a`` with ``a`` below 10**digits; evaluation on a fixed held-out set."""

    def __init__(self, seed: int, digits: int, num_eval: int):
        self.seed, self.hi = seed, 10**digits - 1
        self.held_out = list(range(num_eval))  # a ∈ [0, num_eval) never appears in training

    def _prompt(self, a: int, index: int) -> Prompt:
        return Prompt(text=f"{a}+{a}=", label=str(2 * a), index=index)

    def take(self, start: int, count: int) -> list[Prompt]:
        out = []
        for i in range(start, start + count):
            a = random.Random(f"doubling-{self.seed}-{i}").randint(len(self.held_out), self.hi)
            out.append(self._prompt(a, i))
        return out

    def eval_prompts(self) -> list[Prompt]:
        return [self._prompt(a, i) for i, a in enumerate(self.held_out)]


def doubling(cfg, tokenizer) -> Doubling:
    """Reads its knobs from the run config (``--arith-digits``; 6 held-out prompts)."""
    return Doubling(seed=cfg.seed, digits=cfg.data.arith_digits, num_eval=6)
