"""CPU tensors for ``/update_weights_from_tensor``: shared memory SGLang's scheduler can open.

torch pickles a CPU tensor by sharing its storage. The default strategy (``file_descriptor``) hands
the descriptor over through the sender's ``multiprocessing`` resource sharer, which checks the
sender's authkey: SGLang's scheduler, another process tree, is refused and dies with
``AuthenticationError: digest sent was rejected`` (measured with SGLang 0.5.23 on CPU). The
``file_system`` strategy names a POSIX shared-memory file instead, which any local process can map.
So every CPU tensor we push is first copied into a file-system-shared buffer (once per bucket, however
many engines and TP ranks receive it) and pickled under that strategy; the process-wide strategy is
switched only for the duration of a dump. CUDA tensors travel as CUDA-IPC handles as before.

Lifetimes: each pickle takes a reference on the shared file and the engine drops it once it has
mapped the file, so the sender may free its buffer as soon as the request returns. A file is removed
when the last reference goes; one an engine never loaded (its request failed) lives until torch's
``torch_shm_manager`` exits. That helper, started by the first shared allocation, stays alive while
any process that mapped its files (the SGLang scheduler included) does; it is started here with its
stderr on /dev/null, so a caller reading this process's stderr through a pipe is not kept waiting for
EOF by a long-lived engine.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

_LOCK = threading.RLock()
_MARK = "_mtp_rl_fs_shared"  # set on buffers made here: already shareable, never copied again
_manager_started = False


@contextlib.contextmanager
def file_system_sharing():
    """torch.multiprocessing's sharing strategy is ``file_system`` inside (process-wide, under a lock)."""
    import torch.multiprocessing as mp

    with _LOCK:
        old = mp.get_sharing_strategy()
        mp.set_sharing_strategy("file_system")
        try:
            yield
        finally:
            mp.set_sharing_strategy(old)


def _start_manager_quietly() -> None:
    """Start this process's ``torch_shm_manager`` with stderr on /dev/null (see the module docstring).

    The helper inherits the caller's stderr at the first file-system allocation; fd 2 points to
    /dev/null only for that one allocation (a few milliseconds).
    """
    global _manager_started
    if _manager_started:
        return
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        torch.UntypedStorage._new_shared(1)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    _manager_started = True


def is_shareable(t: torch.Tensor) -> bool:
    """True for a tensor SGLang can take as is: a CUDA tensor, or a buffer made by :func:`shared_copy`."""
    return t.is_cuda or getattr(t, _MARK, False)


def shared_copy(t: torch.Tensor) -> torch.Tensor:
    """``t`` (CPU) copied into a new file-system shared-memory buffer; CUDA tensors and empty ones as they are."""
    if is_shareable(t) or t.numel() == 0:
        return t
    with file_system_sharing():
        _start_manager_quietly()
        storage = torch.UntypedStorage._new_shared(t.numel() * t.element_size())
    out = torch.empty(0, dtype=t.dtype).set_(storage, 0, t.shape)
    out.copy_(t.detach())
    setattr(out, _MARK, True)
    return out


def shared_bucket(named_tensors) -> list[tuple[str, torch.Tensor]]:
    """Every CPU tensor of ``[(name, tensor)]`` in shared memory (see :func:`shared_copy`)."""
    return [(str(n), shared_copy(t)) for n, t in named_tensors]
