"""Graceful stop: SIGTERM/SIGINT or a wall-clock limit end the run at a step boundary, saved.

Slurm sends SIGTERM on preemption and at the time limit; torch's default handling kills the
process at once and every step since the last checkpoint is lost. Megatron-LM's
``--exit-signal-handler`` behaviour instead: the first signal is only noted, the current
optimizer step finishes, the loop saves a checkpoint (when ``--save`` is set, whatever
``--save-interval`` says), flushes metrics and ends with :class:`StopRequested` (exit code
128 + signal number: 143 for SIGTERM, 130 for SIGINT). A second signal exits at once, unless it
comes within :data:`SAME_REQUEST_S` of the first (the same request delivered twice).
``--exit-duration-in-mins`` stops the same way once the run has lasted that long (exit code
:data:`TIME_LIMIT_EXIT`, so a job chain can tell "resume me" from "finished").

With torch.distributed every rank must stop after the same step (a rank that stops alone
leaves the others in a collective): :meth:`GracefulStop.should_stop` all-reduces the flag,
so a signal delivered to one rank stops them all.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

from megatron_mtp_rl.platform.device import collective_device

TIME_LIMIT_EXIT = 3
# A second signal this soon after the first is the same request delivered twice, not "exit now":
# Slurm signals every process of a job step and torchrun forwards the signal it got to its workers,
# and Ctrl-C under torchrun gives each worker SIGINT (from the terminal) then SIGTERM (from torchrun).
SAME_REQUEST_S = 5.0
_NONE, _TIME, _SIGNAL = 0, 1, 2


class StopRequested(SystemExit):
    """The run stopped early on request, after saving; ``code`` is the process exit code.

    A ``SystemExit``: the CLI exits with ``code`` and no traceback; the one-line message was
    printed by the loop.
    """

    def __init__(self, code: int, message: str):
        super().__init__(code)
        self.message = message


class GracefulStop:
    """Notes SIGTERM/SIGINT (and the wall-clock limit) for the loop to act on at a step boundary."""

    def __init__(self, exit_duration_in_mins: float | None = None, *, start_time: float | None = None):
        self.limit_s = exit_duration_in_mins * 60.0 if exit_duration_in_mins else None
        self.start = time.monotonic() if start_time is None else start_time
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, object] = {}

    # -- handlers -------------------------------------------------------------------------
    def install(self) -> GracefulStop:
        """Take over SIGTERM and SIGINT (main thread only; elsewhere, e.g. a Ray actor thread, a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            return self
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._on_signal)
        return self

    def restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signum is not None:
            if now - self._first_at < SAME_REQUEST_S:
                return  # one request delivered twice (see SAME_REQUEST_S)
            os.write(2, f"\nerror: second {name}: exiting now, without saving\n".encode())
            os._exit(128 + signum)
        self.signum, self._first_at = signum, now
        msg = (
            f"\n{name} received: finishing this step, saving, then exiting "
            f"(send it again after {SAME_REQUEST_S:g} s to exit now)\n"
        )
        os.write(2, msg.encode())

    def __enter__(self) -> GracefulStop:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    # -- the loop's question ----------------------------------------------------------------
    def local_reason(self) -> tuple[int, int]:
        if self.signum is not None:
            return _SIGNAL, self.signum
        if self.limit_s is not None and time.monotonic() - self.start >= self.limit_s:
            return _TIME, 0
        return _NONE, 0

    def should_stop(self, group=None) -> bool:
        """Collective when torch.distributed is up: True on every rank when any rank must stop."""
        reason, signum = self.local_reason()
        if dist.is_initialized() and dist.get_world_size(group) > 1:
            t = torch.tensor([reason, signum], dtype=torch.long, device=collective_device(group))
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
            reason, signum = int(t[0]), int(t[1])
        self._agreed = (reason, signum)
        return reason != _NONE

    def stop(self, step: int, total: int, saved: str | None, *, what: str = "step", then: str = "") -> StopRequested:
        """The exception that ends the run after the save; its one-line message is printed (rank 0).

        ``what`` names the unit ("step", "heal step"); ``then`` replaces "rerun the same command
        to resume" after the saved checkpoint's name.
        """
        reason, signum = getattr(self, "_agreed", self.local_reason())
        if reason == _SIGNAL:
            why, code = f"received {signal.Signals(signum).name}", 128 + signum
        else:
            why, code = f"reached --exit-duration-in-mins {self.limit_s / 60:g}", TIME_LIMIT_EXIT
        then = then or "rerun the same command to resume"
        where = f"checkpoint {saved} saved; {then}" if saved else "no --save: nothing saved"
        exc = StopRequested(code, f"stopped: {why} after {what} {step}/{total}; {where}")
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(exc.message, file=sys.stderr, flush=True)
        return exc
