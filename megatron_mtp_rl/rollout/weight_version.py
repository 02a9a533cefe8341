"""The weight-version rule: a generate request names the weights it expects, and is served only with them.

Only trainer rank 0 pushes weights; every other data-parallel rank generates as soon as its own
part of the push (a gather) is done, so without a rule its request can reach the engine before
rank 0's push lands (sampling from the previous, or the initial random, weights). Each push
numbers the weights (1, 2, ...); a request carries the number its trainer rank has pushed, the
engine holds it until it has that version (up to a timeout) and refuses a request for weights it
has already replaced. Version 0 (no push yet) means "the weights the engine started with".
"""

from __future__ import annotations

import threading
import time


class WeightVersionError(RuntimeError):
    """A request could not be served with the weights it expects (one line: what was held, what expected)."""


class VersionGate:
    """The version an engine holds, and the wait for a wanted one (thread-safe)."""

    def __init__(self, version: int = 0):
        self.version = version
        self._cond = threading.Condition()

    def publish(self, version: int) -> None:
        """The engine now holds ``version``."""
        with self._cond:
            self.version = version
            self._cond.notify_all()

    def wait_for(self, expected: int | None, timeout_s: float, *, who: str = "engine") -> None:
        """Return once ``expected`` is held; raise WeightVersionError on a newer one or after ``timeout_s``."""
        if expected is None:
            return
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self.version < expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WeightVersionError(
                        f"{who} still holds weight version {self.version} after {timeout_s:g}s; "
                        f"the request expects {expected} (was the trainer's weight push lost?)"
                    )
                self._cond.wait(left)
            if self.version != expected:
                raise WeightVersionError(
                    f"{who} holds weight version {self.version}, newer than the {expected} the request expects"
                )


def stale_answer(expected: int | None, served: str | None) -> str | None:
    """Why an answer from weights ``served`` (meta_info.weight_version) is not for ``expected``; None if it is."""
    if expected is None or served == str(expected):
        return None
    return f"served with weight version {served}, expected {expected}"
