"""Off-policy rollout: generate later steps' batches while a step trains (``--async-rollout``,
``--max-off-policy-steps K``).

slime's asynchronous trainer, for any engine that generates outside the trainer's process
(the local engine in a child process, the Ray rollout actor, SGLang), generalised to a pipeline of
depth K (AReaL's ``max_head_offpolicyness``). The order is fixed so the run stays deterministic
and resumable:

    step n:  take batch n (ready)  →  start batch n+K in a thread (engine holds θ_{n-1})
             → train on batch n → θ_n  →  wait for batch n+K  →  push θ_n to the engine

Batch n+K is generated entirely by θ_{n-1} and trained at step n+K from θ_old = θ_{n+K-1}: a policy
lag of K steps (less for the first K batches, which the first step generates with θ_0). K = 1 is
``--async-rollout``. Old log-probs are recomputed by the trainer, so the PPO ratio stays that of the
policy being updated; with K > 1 the loss also weights by π_old/π_behaviour (rl/loss.py). The
generated, not yet trained batches are saved with a checkpoint, so a resumed run trains on exactly
what the uninterrupted run would have.
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
        self._thread: threading.Thread | None = None
        self._running: int | None = None
        self._error: BaseException | None = None

    @property
    def step(self) -> int | None:
        """The oldest pending batch's step (None: nothing pending)."""
        return min(self.batches, default=None)

    def submit(self, step: int, weights_step: int, fn: Callable[[], Any]) -> None:
        """Start generating step ``step``'s batch with ``fn`` in a background thread."""
        if self._thread is not None:
            raise RuntimeError("async rollout: a batch is already being generated")
        self._running, self._error = step, None
        self.next_step = step + 1

        def run() -> None:
            try:
                self.batches[step] = [weights_step, fn(), None]
            except BaseException as e:  # re-raised on the trainer's thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name=f"rollout-step-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the batch in generation is done (before a weight push, a save, eval)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            self.next_step = self._running or self.next_step
            raise err

    def unsettled(self) -> list[int]:
        """Generated batches whose prompt consumption the trainer has not counted yet, oldest first."""
        return sorted(s for s, e in self.batches.items() if e[2] is None and s != self._running_now())

    def _running_now(self) -> int | None:
        return self._running if self._thread is not None else None

    def settle(self, step: int, batch: Any, consumed: int) -> None:
        """Record a generated batch as every rank sees it, and the prompts it consumed."""
        entry = self.batches[step]
        entry[1], entry[2] = batch, consumed
        self.gen_cursor = (self.gen_cursor or 0) + consumed

    def take(self, step: int) -> tuple[Any, int] | None:
        """(batch, lag) of step ``step`` when it is pending; None otherwise."""
        if self._running_now() == step:
            self.wait()
        if step not in self.batches:
            return None
        weights_step, batch, _ = self.batches.pop(step)
        return batch, (step - 1) - weights_step

    def consumed(self, step: int) -> int:
        return self.batches[step][2] or 0

    def state_dict(self) -> dict:
        """The generated, not yet trained batches (call after :meth:`wait`)."""
        if self._thread is not None:
            raise RuntimeError("async rollout: save while a batch is being generated")
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
