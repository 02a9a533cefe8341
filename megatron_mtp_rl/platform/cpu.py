"""The CPU shims megatron-core needs to run without a CUDA device.

megatron-core 0.19 assumes CUDA in a handful of places that have nothing to do with the
math. On a machine without a CUDA device (our dev machines and CI) we redirect exactly those
places; on a GPU machine :func:`apply_cpu_shims` is never called, so nothing here is active.
Every shim below says which megatron-core call site needs it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch

_APPLIED = False
_LOCK = threading.Lock()


class _NoOpRngTracker:
    """Replaces megatron's ``CudaRNGStatesTracker``.

    Why: layers fork the tracker around weight init and dropout (``tensor_parallel.random``),
    and the real tracker snapshots ``torch.cuda`` RNG states. On CPU there is one torch
    generator and we keep dropout at 0, so forking is a no-op.
    """

    def reset(self) -> None:
        pass

    def get_states(self) -> dict:
        return {}

    def set_states(self, states: dict) -> None:
        pass

    def add(self, name: str, seed: int) -> None:
        pass

    def is_initialized(self) -> bool:
        return True

    @contextlib.contextmanager
    def fork(self, name: str | None = None):
        yield


class _NoOpStream:
    """Stands in for ``torch.cuda.Stream``.

    Why: the DDP grad buffers (``distributed/param_and_grad_buffer.py``) record and wait on
    the current CUDA stream around gradient all-reduces; on CPU the collectives are
    synchronous, so waiting is meaningless.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return None

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CudaDeviceToCpu(torch.overrides.TorchFunctionMode):
    """Rewrites an explicit CUDA ``device=`` argument of a tensor factory to CPU.

    Why: ``pipeline_parallel/schedules.py`` and ``p2p_communication.py`` build bookkeeping
    tensors with ``device="cuda"`` / ``torch.cuda.current_device()``; one mode covers them
    all instead of patching each call site.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dev = kwargs.get("device")
        if dev is not None and _is_cuda(dev):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def _is_cuda(dev: Any) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    return False


def _tensor_cuda_is_identity(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Replaces ``Tensor.cuda``.

    Why: ``LanguageModule.setup_embeddings_and_output_layer`` moves the tied embedding to
    CUDA before all-reducing it between the first and the last pipeline stage (tied
    embeddings, MTP).
    """
    return self


def apply_cpu_shims() -> None:
    """Install the shims once per process. Refuses to run when CUDA is available."""
    global _APPLIED
    with _LOCK:
        if _APPLIED:
            return
        if torch.cuda.is_available():
            raise RuntimeError("CPU shims must never be applied on a machine with a CUDA device")
        import megatron.core.tensor_parallel.random as mrandom

        # Why: megatron creates ``device=torch.cuda.current_device()`` tensors in the
        # schedules, the grad buffers and the MoE router; answering "cpu" keeps them on CPU.
        torch.cuda.current_device = lambda: "cpu"  # type: ignore[assignment]
        # Why: ``p2p_communication.py`` synchronises the device after send/recv.
        torch.cuda.synchronize = lambda *a, **k: None  # type: ignore[assignment]
        torch.cuda.current_stream = lambda *a, **k: _NoOpStream()  # type: ignore[assignment]
        # A class, not a function: libraries (transformers) subclass / isinstance-check it.
        torch.cuda.Stream = _NoOpStream  # type: ignore[assignment,misc]
        torch.cuda.stream = lambda *a, **k: contextlib.nullcontext()  # type: ignore[assignment]
        # Why: ``model_parallel_cuda_manual_seed`` seeds the CUDA generator.
        torch.cuda.manual_seed = lambda *a, **k: None  # type: ignore[assignment]
        torch.Tensor.cuda = _tensor_cuda_is_identity  # type: ignore[method-assign]

        tracker = _NoOpRngTracker()
        mrandom._CUDA_RNG_STATE_TRACKER = tracker
        mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
        mrandom.initialize_rng_tracker = lambda *a, **k: None

        _CudaDeviceToCpu().__enter__()
        _APPLIED = True


def cpu_shims_active() -> bool:
    return _APPLIED
