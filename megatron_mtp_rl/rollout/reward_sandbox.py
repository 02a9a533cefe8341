"""Reward functions run in worker processes with a per-call timeout.

math-verify can hang on adversarial LaTeX and a user's reward function can raise, leak or
crash the interpreter. Each call runs in a separate worker process; a call that raises,
exceeds ``timeout_s`` or kills its worker (segfault, ``os.abort``) scores 0 and is counted.
A dead or hung worker is replaced and the rest of its work re-issued, so every sample gets
exactly one score.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from dataclasses import dataclass, field


def _worker(conn, spec: str) -> None:
    from megatron_mtp_rl.rollout.rewards import load_reward_fn

    fn = load_reward_fn(spec)
    while True:
        chunk = conn.recv()
        if chunk is None:
            return
        for idx, prompt, response, label in chunk:
            try:
                conn.send((idx, float(fn(prompt, response, label)), None))
            except Exception:
                conn.send((idx, 0.0, traceback.format_exc(limit=3)))


@dataclass
class RewardStats:
    errors: int = 0  # raised, timed out or crashed
    timeouts: int = 0
    crashes: int = 0
    last_errors: list[str] = field(default_factory=list)


class RewardSandbox:
    """A small pool of reward workers; ``score`` returns one float per item, in order."""

    def __init__(self, spec: str, *, workers: int = 2, timeout_s: float = 10.0):
        if workers < 1:
            raise ValueError("--reward-workers must be ≥ 1")
        self.spec = spec
        self.timeout_s = timeout_s
        self.ctx = mp.get_context("spawn")
        self.stats = RewardStats()
        self._workers = [self._start() for _ in range(workers)]

    def _start(self):
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=_worker, args=(child, self.spec), daemon=True)
        proc.start()
        child.close()
        return [proc, parent]

    def _restart(self, i: int) -> None:
        proc, conn = self._workers[i]
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        conn.close()
        self._workers[i] = self._start()

    def _error(self, kind: str, detail: str) -> None:
        self.stats.errors += 1
        if kind == "timeout":
            self.stats.timeouts += 1
        elif kind == "crash":
            self.stats.crashes += 1
        self.stats.last_errors = (self.stats.last_errors + [detail])[-5:]

    def score(self, items: list[tuple[str, str, object]], chunk: int = 32) -> list[float]:
        """Score ``(prompt, response, label)`` items; failures give 0.0.

        Items travel in chunks; the timeout applies to each item (measured from the
        previous result of the same worker). When a worker hangs or dies, the item it was
        on scores 0 and the rest of its chunk is re-queued on a fresh worker.
        """
        results: list[float | None] = [None] * len(items)
        queue = list(range(len(items)))
        busy: dict[int, tuple[list[int], float]] = {}  # worker -> (pending items, last progress)
        while queue or busy:
            for w in range(len(self._workers)):
                if w not in busy and queue:
                    todo, queue = queue[:chunk], queue[chunk:]
                    msg = [(i, *items[i]) for i in todo]
                    try:
                        self._workers[w][1].send(msg)
                    except (BrokenPipeError, OSError):
                        self._restart(w)
                        self._workers[w][1].send(msg)
                    busy[w] = (todo, time.monotonic())
            for w, (pending, last) in list(busy.items()):
                proc, conn = self._workers[w]
                try:
                    while pending and conn.poll(0.002):
                        idx, value, err = conn.recv()
                        results[idx] = value
                        pending.remove(idx)
                        last = time.monotonic()
                        if err:
                            self._error("raise", err.strip().splitlines()[-1])
                except (EOFError, OSError):
                    pass
                if not pending:
                    del busy[w]
                    continue
                dead = not proc.is_alive()
                if dead or time.monotonic() - last > self.timeout_s:
                    culprit = pending[0]
                    if dead:
                        self._error("crash", f"reward worker died (exit {proc.exitcode}) on item {culprit}")
                    else:
                        self._error("timeout", f"reward call on item {culprit} exceeded {self.timeout_s}s")
                    results[culprit] = 0.0
                    queue = pending[1:] + queue
                    del busy[w]
                    self._restart(w)
                else:
                    busy[w] = (pending, last)
        return [float(r) for r in results]

    def close(self) -> None:
        for proc, conn in self._workers:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)
            conn.close()
        self._workers = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


class InProcessScorer:
    """``--reward-workers 0``: score in the trainer process (exceptions still score 0).

    No timeout and no crash isolation: for debugging a reward function only.
    """

    def __init__(self, fn):
        self.fn = fn
        self.stats = RewardStats()

    def score(self, items: list[tuple[str, str, object]]) -> list[float]:
        out = []
        for prompt, response, label in items:
            try:
                out.append(float(self.fn(prompt, response, label)))
            except Exception as e:
                self.stats.errors += 1
                self.stats.last_errors = (self.stats.last_errors + [repr(e)])[-5:]
                out.append(0.0)
        return out

    def close(self) -> None:
        pass


def build_scorer(spec: str, *, workers: int, timeout_s: float):
    """The sandbox for ``workers ≥ 1``, in-process scoring for 0."""
    if workers == 0:
        from megatron_mtp_rl.rollout.rewards import load_reward_fn

        return InProcessScorer(load_reward_fn(spec))
    return RewardSandbox(spec, workers=workers, timeout_s=timeout_s)
