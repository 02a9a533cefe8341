"""Colocated placement: SGLang engines and the trainer take turns on the same GPUs.

One RL step, as slime runs it:

    trainer offloads → engines resume (KV cache) → generate → engines release (all)
    → trainer onloads → train → engines resume (weights) → push weights → next step

(The trainer offloads when the generation starts rather than right after the push: a trainer
tensor read while offloaded would be a read of freed memory, and the step's metrics and a
checkpoint save still read the parameters after the push.)

The engines' memory goes through SGLang's ``/release_memory_occupation`` and
``/resume_memory_occupation`` (tags ``weights`` / ``kv_cache``, sent to every engine by the rank
that started them); the trainer's through ``cluster/offload.py``. Every trainer rank enters the
same phases (barriers around the engines' turns), so all of them have offloaded before an engine
takes the memory back and all have finished generating before the engines let it go.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from megatron_mtp_rl.models.generation import SamplingParams

ALL_TAGS = ("weights", "kv_cache")


class ColocatedEngine:
    """A remote engine (``RemoteEngine``) whose generation and weight pushes take turns with the trainer."""

    remote = True

    def __init__(self, engine, trainer, control, *, barrier: Callable[[], None]):
        self.engine = engine  # the RemoteEngine: generate + push
        self.trainer = trainer  # TrainerOffload
        self.control = control  # SGLangEngine on the rank that started the engines (else None)
        self.barrier = barrier
        self.released: set[str] = set()  # engine memory tags given to the trainer now

    @property
    def client(self):
        return self.engine.client

    @property
    def version(self) -> int:
        return self.engine.version

    def _engines(self, action: str, tags) -> float:
        """Resume or release ``tags`` on every engine (one rank sends; all wait); seconds taken."""
        tags = [t for t in tags if (t in self.released) == (action == "resume")]
        t0 = time.perf_counter()
        self.barrier()
        if tags and self.control is not None:
            (self.control.resume_memory if action == "resume" else self.control.release_memory)(tags)
        self.released = self.released - set(tags) if action == "resume" else self.released | set(tags)
        self.barrier()
        return time.perf_counter() - t0

    @contextlib.contextmanager
    def generation(self) -> Iterator[dict]:
        """The engines' turn (all ranks enter); yields the hand-off metrics, filled on exit."""
        from megatron_mtp_rl.cluster.offload import gpu_memory_gb

        trainer_side = gpu_memory_gb()  # the trainer's peak since the last generation (CUDA only)
        m = {"perf/trainer_offload_time": self.trainer.offload()}
        if trainer_side:
            m["perf/trainer_gpu_peak_gb"] = trainer_side["trainer_peak_gb"]
        m["perf/engine_resume_time"] = self._engines("resume", ALL_TAGS)
        try:
            yield m
        finally:
            engine_side = gpu_memory_gb()  # while the engines still hold their memory
            if engine_side:
                m["perf/engine_gpu_gb"] = engine_side["others_gb"]
            m["perf/engine_release_time"] = self._engines("release", ALL_TAGS)
            m["perf/trainer_onload_time"] = self.trainer.onload()

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int):
        return self.engine.generate(prompts, params, seed=seed)

    def sync_weights(self) -> dict:
        """Engines take their weights' memory back and the push fills it (the trainer steps aside when
        the next generation starts: the step's metrics still read its parameters)."""
        self.trainer.onload()
        resume = self._engines("resume", ("weights",))
        metrics = dict(self.engine.sync_weights())
        metrics["perf/engine_weights_resume_time"] = resume
        return metrics

    def close(self) -> None:
        self.trainer.onload()
        self.engine.close()


def generation_phase(engine):
    """``with generation_phase(engine) as handoff_metrics:`` around every generation (all ranks)."""
    phase = getattr(engine, "generation", None)
    return phase() if phase is not None else contextlib.nullcontext({})
