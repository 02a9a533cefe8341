"""The engine protocol every rollout backend implements (local in-process, SGLang)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from megatron_mtp_rl.models.generation import SamplingParams


@dataclass
class Completion:
    """One generated response: token ids, their log-probs, and backend meta information."""

    response_ids: list[int]
    logprobs: list[float]
    finished: bool  # ended with EOS (False: truncated at the length limit)
    meta: dict = field(default_factory=dict)


class RolloutEngine(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int) -> tuple[list[Completion], dict]:
        """Completions in prompt order, plus engine statistics for the metrics."""
        ...

    def sync_weights(self) -> None:
        """Make the engine generate with the trainer's current weights."""
        ...


__all__ = ["Completion", "RolloutEngine", "SamplingParams"]
