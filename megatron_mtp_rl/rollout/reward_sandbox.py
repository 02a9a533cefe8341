"""Reward functions run in worker processes with a per-call timeout.

math-verify can hang on adversarial LaTeX and a user's reward function can raise, leak or
crash the interpreter. Each call runs in a separate worker process; a call that raises,
returns something other than a finite number, exceeds ``timeout_s`` or kills its worker
(segfault, ``os.abort``) scores 0 and is counted. A dead or hung worker is replaced and the
rest of its work re-issued, so every sample gets exactly one score.

Failures are loud: the step's progress line shows the count, and a step in which *every*
call failed stops the run (:func:`check_step_rewards`) with the first failure's traceback
from the worker: a reward function that always fails would otherwise train on zeros.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass, field


def _worker(conn, spec: str) -> None:
    from megatron_mtp_rl.rollout.die_with_parent import arm_parent_death_signal
    from megatron_mtp_rl.rollout.rewards import check_reward, load_reward_fn

    # The trainer decides when to stop (it finishes its step on SIGTERM/SIGINT, which
    # Ctrl-C and Slurm also deliver to this process); it closes the pipe to end a worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    arm_parent_death_signal()  # killed with the trainer even mid-call (a hung reward never notices EOF)
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:
        return  # the trainer died while this worker was starting
    fn = load_reward_fn(spec)
    conn.send((None, None, None))  # started: per-call timeouts count from here, not from the spawn
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone
        if chunk is None:
            return
        for idx, prompt, response, label in chunk:
            try:
                conn.send((idx, check_reward(fn(prompt, response, label)), None))
            except Exception:
                conn.send((idx, 0.0, traceback.format_exc()))


STARTUP_S = 120.0  # a fresh worker's allowance to import its reward module (a loaded node is slow)


class RewardError(RuntimeError):
    """Every reward call of a step failed; the message carries the first failure's traceback."""


@dataclass
class RewardStats:
    errors: int = 0  # raised, returned a non-number / non-finite value, timed out or crashed
    timeouts: int = 0
    crashes: int = 0
    scored: int = 0  # calls made, failed or not
    last_errors: list[str] = field(default_factory=list)
    first_error: str | None = None  # full text (worker traceback) of the first failure since the last check

    def record(self, detail: str) -> None:
        self.errors += 1
        self.last_errors = (self.last_errors + [detail.strip().splitlines()[-1]])[-5:]
        if self.first_error is None:
            self.first_error = detail.strip()


def check_step_rewards(stats: RewardStats | None, errors: float, scored: float, step: int, group=None) -> None:
    """Stop the run when every reward call of a step failed (collective over ``group`` when distributed).

    ``errors``/``scored``: this rank's counts for the step. All ranks raise together, so no
    rank is left waiting in a collective; each prints its own first traceback when it has one.
    """
    import torch
    import torch.distributed as dist

    totals = torch.tensor([float(errors), float(scored)], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        nccl = dist.get_backend(group) == "nccl"
        t = totals.to(torch.device("cuda", torch.cuda.current_device())) if nccl else totals
        dist.all_reduce(t, group=group)
        totals = t.cpu()
    first = None
    if stats is not None:
        first, stats.first_error = stats.first_error, None
    bad, total = int(totals[0]), int(totals[1])
    if total > 0 and bad == total:
        where = first if first else "(the failures happened on another rank; see its output)"
        raise RewardError(f"every reward call of step {step} failed ({bad} of {total}); the first failure:\n{where}")


class RewardSandbox:
    """A small pool of reward workers; ``score`` returns one float per item, in order."""

    def __init__(self, spec: str, *, workers: int = 2, timeout_s: float = 10.0):
        if workers < 1:
            raise ValueError("--reward-workers must be ≥ 1")
        self.spec = spec
        self.timeout_s = timeout_s
        self.ctx = mp.get_context("spawn")
        self.stats = RewardStats()
        self._ready: set[int] = set()  # workers past start-up (interpreter + reward module import)
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
        self._ready.discard(i)
        self._workers[i] = self._start()

    def _error(self, kind: str, detail: str) -> None:
        if kind == "timeout":
            self.stats.timeouts += 1
        elif kind == "crash":
            self.stats.crashes += 1
        self.stats.record(detail)

    def score(self, items: list[tuple[str, str, object]], chunk: int = 32) -> list[float]:
        """Score ``(prompt, response, label)`` items; failures give 0.0.

        Items travel in chunks; the timeout applies to each item (measured from the
        previous result of the same worker). When a worker hangs or dies, the item it was
        on scores 0 and the rest of its chunk is re-queued on a fresh worker.
        """
        results: list[float | None] = [None] * len(items)
        self.stats.scored += len(items)
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
                        last = time.monotonic()
                        if idx is None:  # start-up done
                            self._ready.add(w)
                            continue
                        results[idx] = value
                        pending.remove(idx)
                        if err:
                            self._error("raise", err)
                except (EOFError, OSError):
                    pass
                if not pending:
                    del busy[w]
                    continue
                dead = not proc.is_alive()
                limit = self.timeout_s if w in self._ready else max(self.timeout_s, STARTUP_S)
                if dead or time.monotonic() - last > limit:
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
    """``--reward-workers 0``: score in the trainer process (failures still score 0 and are counted).

    No timeout and no crash isolation: for debugging a reward function only.
    """

    def __init__(self, fn):
        self.fn = fn
        self.stats = RewardStats()

    def score(self, items: list[tuple[str, str, object]]) -> list[float]:
        from megatron_mtp_rl.rollout.rewards import check_reward

        out = []
        self.stats.scored += len(items)
        for prompt, response, label in items:
            try:
                out.append(check_reward(self.fn(prompt, response, label)))
            except Exception:
                self.stats.record(traceback.format_exc())
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
