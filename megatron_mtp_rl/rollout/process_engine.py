"""The local engine in a separate process: its own model replica, weights pushed after each step.

What ``--async-rollout`` needs from the embedded engine: generation that runs *while* the
trainer trains. The child process (``spawn``; a single-rank process group of its own, CPU or
the trainer's GPU) holds a TP=1 replica built from the run's ``ModelArgs`` and serves requests
over a pipe, one at a time and in order: ``weights`` (full tensors under TP=1 names, MTP
layers included, sent through torch's shared-memory tensor pickling) and ``generate``. So a
push queued behind a generate request only lands after that request finished: the version a
batch was generated with is exact, which the async loop's determinism relies on.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from megatron_mtp_rl.models.generation import SamplingParams


def _serve(
    conn,
    model_args: dict,
    vocab_size: int,
    speculative: bool,
    seed: int,
    threads: int,
    dtype: str | None = None,
    record_routes: bool = False,
) -> None:
    """Child process: build the replica, then answer requests until ``close`` or EOF."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        os.environ.pop(k, None)  # a single-rank group of its own, never the trainer's rendezvous
    if threads > 0:
        torch.set_num_threads(threads)
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models.presets import ModelArgs
    from megatron_mtp_rl.models.provider import RuntimeOptions, build_model
    from megatron_mtp_rl.models.state import load_full_state_dict
    from megatron_mtp_rl.rollout.local_engine import LocalEngine

    platform.initialize(seed=seed)
    model = build_model(ModelArgs(**model_args), runtime=RuntimeOptions(routing_replay=record_routes))
    model.eval()
    engine = LocalEngine(
        model, vocab_size=vocab_size, speculative=speculative, dtype=dtype, record_routes=record_routes
    )
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            break
        kind = msg[0]
        try:
            if kind == "weights":
                load_full_state_dict(model, msg[1])  # every tensor of the replica, or KeyError naming the missing
                conn.send(("ok", msg[2]))
            elif kind == "generate":
                _, prompts, params, gen_seed, stop = msg
                conn.send(("ok", engine.generate(prompts, params, seed=gen_seed, stop=stop)))
            elif kind == "close":
                conn.send(("ok", None))
                break
        except Exception as e:  # report, keep serving: the trainer decides
            conn.send(("error", f"{type(e).__name__}: {e}"))
    platform.destroy()


class ProcessEngine:
    """A :class:`~megatron_mtp_rl.rollout.local_engine.LocalEngine` in a child process.

    ``state_fn()`` returns the trainer's full state dict (it may be collective: it is called on
    every rank); only the rank that owns the child sends it. ``remote``: generation happens
    outside the trainer's process group.
    """

    remote = True

    def __init__(
        self,
        model_args: dict,
        state_fn: Callable[[], dict],
        *,
        vocab_size: int,
        speculative: bool = False,
        seed: int = 1234,
        threads: int = 1,
        owner: bool = True,
        dtype: str | None = None,
        record_routes: bool = False,
    ):
        self.state_fn = state_fn
        self.version = 0
        self._lock = threading.Lock()  # one request in flight per pipe (the prefetch thread + the loop)
        self._proc = None
        self._conn = None
        if owner:
            ctx = mp.get_context("spawn")
            self._conn, child = ctx.Pipe()
            self._proc = ctx.Process(
                target=_serve,
                args=(child, model_args, vocab_size, speculative, seed, threads, dtype, record_routes),
                daemon=True,
                name="mtp-rl-rollout",
            )
            self._proc.start()
            child.close()
            self._reply()  # "ready"

    def _reply(self):
        kind, value = self._conn.recv()
        if kind == "error":
            raise RuntimeError(f"rollout process: {value}")
        return value

    def _ask(self, *msg):
        with self._lock:
            self._conn.send(msg)
            return self._reply()

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int, stop=None):
        if self._conn is None:
            raise RuntimeError("rollout process engine: this rank does not own the rollout process")
        return self._ask("generate", prompts, params, seed, stop)

    def sync_weights(self) -> dict:
        """Send the current weights (every rank calls: the gather may be collective)."""
        push, metrics = self.stage_weights()
        push()
        return metrics

    def stage_weights(self) -> tuple[Callable[[], None], dict]:
        """Copy the current weights now, send them later: (``push()``, metrics).

        Every rank calls (the gather may be collective); ``push()`` touches only the pipe, so it may run on
        another thread, after the generation in flight (the off-policy queue, rollout/async_rollout.py).
        The copy lives until the push: one full CPU copy per push not yet sent."""
        self.version += 1
        version, state = self.version, self.state_fn()
        cpu = {k: v.detach().to("cpu", copy=True) for k, v in state.items()} if self._conn is not None else None

        def push() -> None:
            if cpu is not None:
                self._ask("weights", cpu, version)
                cpu.clear()

        return push, {"rollout/weight_version": float(version)}

    def close(self) -> None:
        if self._proc is None:
            return
        try:
            self._ask("close")
        except (EOFError, OSError, RuntimeError):
            pass
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()
        self._proc = self._conn = None
