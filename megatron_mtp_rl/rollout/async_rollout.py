"""One-step-off-policy rollout: generate step n+1's batch while step n trains (``--async-rollout``).

slime's asynchronous trainer, for any engine that generates outside the trainer's process
(the local engine in a child process, the Ray rollout actor, SGLang). The order is fixed so the
run stays deterministic and resumable:

    step n:  take batch n (ready)  →  start batch n+1 in a thread (engine holds θ_{n-1})
             → train on batch n → θ_n  →  wait for batch n+1  →  push θ_n to the engine

Batch n+1 is generated entirely by θ_{n-1} and trained at step n+1 from θ_old = θ_n: a policy
lag of one step (zero for the first batch). Old log-probs are recomputed by the trainer, so the
PPO ratio stays that of the policy being updated. The pending batch is saved with a checkpoint,
so a resumed run trains on exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class OneStepAhead:
    """The rollout batch generated ahead of the step that will train on it."""

    def __init__(self) -> None:
        self.step: int | None = None  # the RL step the pending batch is for
        self.weights_step = 0  # trainer steps done when the engine got the weights that generate it
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._error: BaseException | None = None

    def submit(self, step: int, weights_step: int, fn: Callable[[], Any]) -> None:
        """Start generating step ``step``'s batch with ``fn`` in a background thread."""
        if self._thread is not None:
            raise RuntimeError("async rollout: a batch is already being generated")
        self.step, self.weights_step = step, weights_step
        self._result = self._error = None

        def run() -> None:
            try:
                self._result = fn()
            except BaseException as e:  # re-raised on the trainer's thread by wait()
                self._error = e

        self._thread = threading.Thread(target=run, name=f"rollout-step-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        """Block until the pending batch is generated (before a weight push, a save, eval)."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error, self.step = self._error, None, None
            raise err

    def take(self, step: int) -> tuple[Any, int] | None:
        """(batch, lag) of step ``step`` when it is the pending one; None otherwise."""
        if self.step != step:
            return None
        self.wait()
        out, self.step, self._result = self._result, None, None
        return out, (step - 1) - self.weights_step

    def state_dict(self) -> dict:
        """The generated, not yet trained batch (call after :meth:`wait`)."""
        if self._thread is not None:
            raise RuntimeError("async rollout: save while a batch is being generated")
        return {"step": self.step, "weights_step": self.weights_step, "batch": self._result}

    def load_state_dict(self, state: dict | None) -> None:
        if not state or state.get("step") is None:
            return
        self.step, self.weights_step, self._result = state["step"], state["weights_step"], state["batch"]
