"""Off-policy rollout: generate later steps' batches while a step trains (``--async-rollout``,
``--max-off-policy-steps K``).

slime's asynchronous trainer, for any engine that generates outside the trainer's process
(the local engine in a child process, the Ray rollout actor, SGLang), generalised to a pipeline of
depth K (AReaL's ``max_head_offpolicyness``). The order is fixed so the run stays deterministic
and resumable:

    step n:  take batch n  →  queue batch n+K (the engine holds θ_{n-1})
             → train on batch n → θ_n  →  queue the push of θ_n after batch n+K

Batch n+K is generated entirely by θ_{n-1} and trained at step n+K from θ_old = θ_{n+K-1}: a policy
lag of K steps (less for the first K batches, which the first step generates with θ_0). K = 1 is
``--async-rollout``. Old log-probs are recomputed by the trainer, so the PPO ratio stays that of the
policy being updated; with K > 1 the loss also weights by π_old/π_behaviour (rl/loss.py).

The jobs (generate a batch, push weights) run one after another on background threads, in the order
the trainer queued them. Where the engine can take a push later (a copy of the weights staged now,
``stage_weights``), the trainer queues it and goes on: it waits only for a batch it is about to train
on, so with K > 1 a slow batch is absorbed by the ones generated ahead. Elsewhere the push waits for
the batch in generation (a collective push needs every rank at once). The generated, not yet trained
batches are saved with a checkpoint, so a resumed run trains on exactly what the uninterrupted run
would have.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class OneStepAhead:
    """The rollout batches generated ahead of the steps that will train on them (``depth`` = K)."""

    def __init__(self, depth: int = 1) -> None:
        if depth < 1:
            raise ValueError(f"--max-off-policy-steps must be ≥ 1, got {depth}")
        self.depth = depth
        # step -> [weights_step, batch, consumed]; consumed: prompts the batch took from the stream over
        # every DP rank, None until settled on the trainer's thread (train/step.py)
        self.batches: dict[int, list] = {}
        self.next_step = 1  # the first batch not submitted yet
        self.gen_cursor: int | None = None  # the data cursor after the last settled batch (None: the loop's)
        self._last: threading.Thread | None = None  # the last job queued; each job first joins the one before
        self._producing: dict[int, threading.Thread] = {}  # step -> the job generating its batch
        self._errors: list[tuple[int | None, BaseException]] = []  # (step or None for a push, error)
        self._lock = threading.Lock()

    def _queue(self, name: str, job: Callable[[], None], step: int | None) -> threading.Thread:
        before = self._last

        def run() -> None:
            if before is not None:
                before.join()
            with self._lock:
                if self._errors:  # a job before failed: the rest of the queue does not run
                    return
            try:
                job()
            except BaseException as e:  # re-raised on the trainer's thread by wait()/take()
                with self._lock:
                    self._errors.append((step, e))

        t = threading.Thread(target=run, name=name, daemon=True)
        self._last = t
        t.start()
        return t

    def submit(self, step: int, weights_step: int, fn: Callable[[], Any]) -> None:
        """Queue the generation of step ``step``'s batch with ``fn`` (after every job queued before)."""
        self.next_step = step + 1

        def job() -> None:
            batch = fn()
            with self._lock:
                self.batches[step] = [weights_step, batch, None]

        self._producing[step] = self._queue(f"rollout-step-{step}", job, step)

    def after(self, fn: Callable[[], None], name: str = "rollout-weights") -> None:
        """Queue ``fn`` (a staged weight push) behind the batches queued so far."""
        self._queue(name, fn, None)

    @property
    def busy(self) -> bool:
        """Whether a queued job is still running."""
        return self._last is not None and self._last.is_alive()

    def wait(self, step: int | None = None) -> None:
        """Block until every queued job (or only the one generating ``step``'s batch) is done.

        Before a collective weight push, a save, an evaluation, closing the engine."""
        t = self._last if step is None else self._producing.get(step)
        if t is not None:
            t.join()
        if step is None:
            self._last = None
        self._producing = {s: t for s, t in self._producing.items() if t.is_alive()}
        with self._lock:
            if not self._errors:
                return
            failed, err = self._errors[0]
        self._drain()
        self._errors.clear()
        if failed is not None:  # that batch and every one after it are generated again when asked for
            self.next_step = min(failed, self.next_step)
        raise err

    def _drain(self) -> None:
        """Let every queued job end (after a failure the rest return at once)."""
        if self._last is not None:
            self._last.join()
        self._last, self._producing = None, {}

    def unsettled(self) -> list[int]:
        """Generated batches whose prompt consumption the trainer has not counted yet, oldest first."""
        with self._lock:
            return sorted(s for s, e in self.batches.items() if e[2] is None)

    def settle(self, step: int, batch: Any, consumed: int) -> None:
        """Record a generated batch as every rank sees it, and the prompts it consumed."""
        with self._lock:
            entry = self.batches[step]
            entry[1], entry[2] = batch, consumed
            self.gen_cursor = (self.gen_cursor or 0) + consumed

    def cursor(self, local_consumed: Callable[[Any], int]) -> int:
        """The data cursor for the next batch, from a queued job: the settled cursor plus what the generated,
        not yet settled batches consumed (``local_consumed(batch)``: this rank's count, the same on every DP
        rank where the queue runs ahead of the trainer)."""
        with self._lock:
            ahead = sum(local_consumed(e[1]) for e in self.batches.values() if e[2] is None)
            return (self.gen_cursor or 0) + ahead

    def take(self, step: int) -> tuple[Any, int] | None:
        """(batch, lag) of step ``step`` when it is pending; None otherwise."""
        if step in self._producing:
            self.wait(step)
        with self._lock:
            if step not in self.batches:
                return None
            weights_step, batch, _ = self.batches.pop(step)
        return batch, (step - 1) - weights_step

    def consumed(self, step: int) -> int:
        with self._lock:
            return self.batches[step][2] or 0

    def state_dict(self) -> dict:
        """The generated, not yet trained batches (call after :meth:`wait`)."""
        if self.busy:
            raise RuntimeError("async rollout: save while a batch is being generated")
        with self._lock:
            return {"batches": dict(self.batches), "next_step": self.next_step, "gen_cursor": self.gen_cursor}

    def load_state_dict(self, state: dict | None) -> None:
        if not state:
            return
        if "batches" not in state:  # a checkpoint of the one-step form: {step, weights_step, batch}
            if state.get("step") is None:
                return
            state = {"batches": {state["step"]: [state["weights_step"], state["batch"], None]},
                     "next_step": state["step"] + 1, "gen_cursor": None}  # fmt: skip
        self.batches = {k: list(v) for k, v in state["batches"].items()}
        self.next_step, self.gen_cursor = state["next_step"], state["gen_cursor"]
