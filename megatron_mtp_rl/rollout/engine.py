"""The one protocol every rollout backend implements: generate, and sync the trainer's weights.

Three backends (built by ``train/builders.py:build_engine``):

- local (:class:`~megatron_mtp_rl.rollout.local_engine.LocalEngine`): generates with the
  training model itself; ``sync_weights`` has nothing to do.
- SGLang and a Ray rollout actor (:class:`RemoteEngine`): a client that generates elsewhere,
  plus the trainer-side push that sends the current weights there (``WeightSync`` for SGLang,
  a full-tensor push for the Ray actor).
"""

from __future__ import annotations

from collections.abc import Callable
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
    # True: generation happens outside the trainer's process group, so one rank per
    # model-parallel group asks and broadcasts (train/step.py:on_mp_leader). False: every rank
    # takes part (generation is a collective forward of the training model).
    remote: bool

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int) -> tuple[list[Completion], dict]:
        """Completions in prompt order, plus engine statistics for the metrics."""
        ...

    def sync_weights(self) -> dict:
        """Make the engine generate with the trainer's current weights; metrics of the sync.

        Called on EVERY trainer rank (a push gathers tensor-parallel shards collectively).
        """
        ...

    def close(self) -> None:
        """Stop what the engine started (servers, actors); idempotent."""
        ...


class RemoteEngine:
    """A generator living elsewhere (SGLang servers, a Ray actor) + the push that updates it.

    ``client`` is None on ranks that never generate (not the first of their model-parallel
    group); ``push()`` runs on every rank and returns the sync's metrics.
    """

    remote = True

    def __init__(self, client, push: Callable[[], dict], *, name: str):
        self.client = client
        self.push = push
        self.name = name
        self.version = 0  # the weights this rank pushed last (0: the engine's initial ones)

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int):
        """Generated with the weights of this rank's last push, never older ones (rollout/weight_version.py)."""
        if self.client is None:
            raise RuntimeError(f"{self.name} engine: this rank does not generate (not a model-parallel leader)")
        return self.client.generate(prompts, params, seed=seed, weight_version=self.version or None)

    def sync_weights(self) -> dict:
        metrics = self.push()
        self.version = int(metrics.get("rollout/weight_version", self.version))
        return metrics

    def close(self) -> None:
        if self.client is not None and hasattr(self.client, "close"):
            self.client.close()
        self.client = None


__all__ = ["Completion", "RemoteEngine", "RolloutEngine", "SamplingParams"]
