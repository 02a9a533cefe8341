"""A rollout actor on Ray holding its own model replica with the local engine, and the proxy
engine the trainers use to reach it (``mtp-rl train --ray``).

The actor is a separate process (its own single-rank torch.distributed group); the trainer
pushes weights to it after every step (full, TP-gathered tensors under TP=1 names, MTP
layers included), so rollouts always sample from the current policy.
"""

from __future__ import annotations

import ray

from megatron_mtp_rl.models.generation import SamplingParams


@ray.remote
class RolloutActor:
    """Generates with a TP=1 replica of the policy (``LocalEngine``), on CPU or one GPU."""

    def __init__(self, model_args: dict, *, seed: int, speculative: bool, vocab_size: int):
        from megatron_mtp_rl import platform
        from megatron_mtp_rl.models.presets import ModelArgs
        from megatron_mtp_rl.models.provider import build_model
        from megatron_mtp_rl.rollout.local_engine import LocalEngine

        platform.initialize(seed=seed)
        self.model = build_model(ModelArgs(**model_args))
        self.engine = LocalEngine(self.model, vocab_size=vocab_size, speculative=speculative)
        self.version = 0

    def load_weights(self, state: dict, version: int) -> int:
        """Full megatron tensors (TP=1/EP=1 names) from the trainer; returns the version held."""
        from megatron_mtp_rl.models.state import load_full_state_dict

        load_full_state_dict(self.model, state)  # every tensor of the replica, or KeyError naming the missing
        self.version = version
        return version

    def generate(self, prompts: list[list[int]], params: SamplingParams, seed: int):
        return self.engine.generate(prompts, params, seed=seed)

    def weight_version(self) -> int:
        return self.version


class RayRolloutClient:
    """The trainer-side generate call into a RolloutActor (the client of a ``RemoteEngine``).

    Weights reach the actor through the push ``train/builders.py:build_engine`` pairs it with.
    """

    def __init__(self, actor):
        self.actor = actor

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int):
        outs, stats = ray.get(self.actor.generate.remote(prompts, params, seed))
        return outs, stats

    def close(self) -> None:
        """The actor belongs to the driver (``train/ray_launch.py``), which ends it."""
