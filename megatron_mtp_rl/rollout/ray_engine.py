"""A rollout actor on Ray holding its own model replica with the local engine, and the proxy
engine the trainers use to reach it (``mtp-rl train --ray``).

The actor is a separate process (its own single-rank torch.distributed group); the trainer
pushes weights to it after every step (full, TP-gathered tensors under TP=1 names, MTP
layers included), and every generate request names the version it expects, so rollouts always
sample from the current policy (rollout/weight_version.py).
"""

from __future__ import annotations

import threading

import ray

from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.weight_version import VersionGate, WeightVersionError


class RolloutReplica:
    """Generates with a TP=1 replica of the policy (``LocalEngine``), on CPU or one GPU.

    Its weights before the first push are of no use (``seed`` differs from the trainer's on
    purpose, so a request served from them would show as a large rollout–trainer mismatch).
    """

    def __init__(self, model_args: dict, *, seed: int, speculative: bool, vocab_size: int):
        from megatron_mtp_rl import platform
        from megatron_mtp_rl.models.presets import ModelArgs
        from megatron_mtp_rl.models.provider import build_model
        from megatron_mtp_rl.rollout.local_engine import LocalEngine

        platform.initialize(seed=seed)
        self.model = build_model(ModelArgs(**model_args))
        self.engine = LocalEngine(self.model, vocab_size=vocab_size, speculative=speculative)
        self.gate = VersionGate()
        self._busy = threading.Lock()  # one generate or load at a time on the replica

    def load_weights(self, state: dict, version: int) -> int:
        """Full megatron tensors (TP=1/EP=1 names) from the trainer; returns the version held."""
        from megatron_mtp_rl.models.state import load_full_state_dict

        with self._busy:
            load_full_state_dict(self.model, state)  # every tensor of the replica, or KeyError naming the missing
            self.gate.publish(version)
        return version

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        seed: int,
        weight_version: int | None = None,
        timeout_s: float = 600.0,
    ):
        """Served once the replica holds ``weight_version`` (None: whatever it holds)."""
        self.gate.wait_for(weight_version, timeout_s, who="rollout actor")
        with self._busy:
            self.gate.wait_for(weight_version, 0.0, who="rollout actor")  # not replaced meanwhile
            return self.engine.generate(prompts, params, seed=seed)

    def weight_version(self) -> int:
        return self.gate.version


# Threaded: a generate waiting for its weight version must not block the push it waits for.
RolloutActor = ray.remote(max_concurrency=8)(RolloutReplica)


class RayRolloutClient:
    """The trainer-side generate call into a RolloutActor (the client of a ``RemoteEngine``).

    Weights reach the actor through the push ``train/builders.py:build_engine`` pairs it with.
    """

    def __init__(self, actor, *, version_timeout_s: float = 600.0):
        self.actor = actor
        self.version_timeout_s = version_timeout_s

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int, weight_version=None):
        ref = self.actor.generate.remote(prompts, params, seed, weight_version, self.version_timeout_s)
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as e:
            if isinstance(e.cause, WeightVersionError):
                raise WeightVersionError(str(e.cause)) from None
            raise

    def close(self) -> None:
        """The actor belongs to the driver (``cluster/ray_launch.py``), which ends it."""
