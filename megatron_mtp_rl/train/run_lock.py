"""One run per ``--save`` / ``--metrics-jsonl``: an advisory lock held for the run's life.

Two runs writing the same checkpoint directory delete each other's ``.tmp_iter_*`` and
interleave their metrics. The first run takes ``fcntl.flock`` on a lock file beside what it
writes and records its pid and host there; a second run fails at start-up with a message
naming them. The kernel drops the lock when the holder dies (even by SIGKILL), so a crashed
run never blocks the next one; the file itself stays and is simply re-locked.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
from pathlib import Path

from megatron_mtp_rl.errors import ConfigError

LOCK_NAME = ".mtp_rl.lock"


class RunLock:
    """An exclusive, non-blocking ``flock`` on ``path``; ``release`` (or process exit) frees it."""

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what  # e.g. "--save /ckpt", used in messages
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ConfigError(f"{self.what} is not writable: {e.strerror or e} ({self.path})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(
                f"{self.what} is in use by another run ({holder}; lock {self.path}): "
                "wait for it to finish or choose another path"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}\n".encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"


def check_writable(directory: str | Path, what: str) -> None:
    """Create ``directory`` if needed and prove a file can be written there (``ConfigError`` otherwise).

    Asking ``os.access`` is not enough: root passes every permission check, while a
    read-only mount or a path under a regular file still refuses; writing a probe file asks
    the filesystem itself.
    """
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=d, prefix=".write_probe_"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} is not writable: {e.strerror or e} ({d})") from None


def lock_run(save: str | None, metrics_jsonl: str | None) -> list[RunLock]:
    """Check ``--save`` is writable and lock it and ``--metrics-jsonl``; call before building the model.

    Returns the held locks (keep them for the run's life; ``release`` them at the end). On
    failure every lock taken so far is released and ``ConfigError`` names the holder.
    """
    locks: list[RunLock] = []
    try:
        if save:
            check_writable(save, f"--save {save}")
            locks.append(RunLock(Path(save) / LOCK_NAME, f"--save {save}").acquire())
        if metrics_jsonl:
            p = Path(metrics_jsonl)
            locks.append(RunLock(p.with_name(p.name + ".lock"), f"--metrics-jsonl {metrics_jsonl}").acquire())
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


def release_all(locks: list[RunLock]) -> None:
    for lock in reversed(locks):
        lock.release()


_held: list[RunLock] = []  # this process's run locks (one run at a time per process)


def claim_run(save: str | None, metrics_jsonl: str | None, load: str | None, *, auto_resume: bool = True) -> str | None:
    """Start-up, before the model is built: lock ``--save``/``--metrics-jsonl`` and settle ``--load``.

    Global rank 0 checks ``--save`` is writable, takes the locks (held until
    :func:`release_run` or process exit) and decides whether a used ``--save`` is resumed
    (one line says so) or refused, and moves an earlier run aside when this one starts from
    another ``--load`` (:func:`set_aside_earlier_run`); the decision is broadcast, so every rank returns the same
    ``--load`` or raises the same ``ConfigError``.
    """
    import torch.distributed as dist

    from megatron_mtp_rl.train.checkpoint import resolve_auto_resume, set_aside_earlier_run

    release_run()  # an earlier run in this process (tests, tools) is over
    outcome: tuple = (load, "", None)
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            _held.extend(lock_run(save, metrics_jsonl))
            keep = [LOCK_NAME]
            if save and metrics_jsonl and Path(metrics_jsonl).resolve().parent == Path(save).resolve():
                keep.append(Path(metrics_jsonl).name + ".lock")  # held by this run: stays with it
            moved = set_aside_earlier_run(save, load, keep=tuple(keep))
            load, message = resolve_auto_resume(save, load, auto_resume=auto_resume)
            outcome = (load, moved or message, None)
        except ConfigError as e:
            release_run()
            outcome = (load, "", str(e))
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [outcome]
        dist.broadcast_object_list(box, src=0)
        outcome = box[0]
    load, message, error = outcome
    if error:
        raise ConfigError(error)
    if message and (not dist.is_initialized() or dist.get_rank() == 0):
        print(message, flush=True)
    return load


def release_run() -> None:
    """Free the locks :func:`claim_run` took (the end of a run; process exit frees them too)."""
    release_all(_held)
    _held.clear()
