"""Trainer offload/onload for the colocated hand-off: parameters, gradients and optimizer state leave
the GPU while the SGLang engines generate on it, and come back bit for bit.

Every tensor's *storage* is copied out (to pinned host memory on CUDA; to another CPU storage on
CPU) and, on CUDA, resized to 0 bytes, then resized back and refilled: megatron's contiguous parameter and
gradient buffers, the views the model's parameters are into them, and the optimizer's state keep
their identity, so nothing holding a reference (DDP hooks, the optimizer, the weight sync) needs
to be told. (``torch_memory_saver``, which slime uses, would also release memory allocated
outside these tensors, e.g. the caching allocator's free blocks; it is not used here.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch


def _tensors(model: torch.nn.Module, optimizer) -> Iterator[torch.Tensor]:
    for p in model.parameters():
        yield p
        for g in (getattr(p, "main_grad", None), p.grad):
            if g is not None:
                yield g
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]) if optimizer is not None else []:
        inner = getattr(opt, "optimizer", opt)
        for group in inner.param_groups:
            for p in group["params"]:
                yield p
                if p.grad is not None:
                    yield p.grad
        for state in inner.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


class TrainerOffload:
    """``offload()`` / ``onload()`` of a model and its optimizer; both idempotent."""

    def __init__(self, model: torch.nn.Module, optimizer):
        self.model, self.optimizer = model, optimizer
        self._saved: list[tuple[torch.UntypedStorage, torch.Tensor]] = []
        self.offloaded = False

    def offload(self) -> float:
        """Move every storage out (seconds taken)."""
        if self.offloaded:
            return 0.0
        t0 = time.perf_counter()
        seen = set()
        for t in _tensors(self.model, self.optimizer):
            st = t.untyped_storage()
            if st.nbytes() == 0 or st.data_ptr() in seen:
                continue
            seen.add(st.data_ptr())
            raw = torch.empty(0, dtype=torch.uint8, device=st.device).set_(st)
            host = torch.empty(raw.shape, dtype=torch.uint8, pin_memory=raw.is_cuda)
            host.copy_(raw)
            self._saved.append((st, host))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        for st, _ in self._saved:
            if st.device.type == "cuda":  # CPU: the copy-out and copy-back only (nothing to free for a GPU)
                st.resize_(0)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.offloaded = True
        return time.perf_counter() - t0

    def onload(self) -> float:
        """Bring every storage back, byte for byte (seconds taken)."""
        if not self.offloaded:
            return 0.0
        t0 = time.perf_counter()
        for st, host in self._saved:
            if st.nbytes() != host.numel():
                st.resize_(host.numel())
            torch.empty(0, dtype=torch.uint8, device=st.device).set_(st).copy_(host)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._saved.clear()
        self.offloaded = False
        return time.perf_counter() - t0

    def resident_bytes(self) -> int:
        """Bytes the model and optimizer hold on the GPU now (0 while offloaded; CPU storages are kept)."""
        seen, total = set(), 0
        for t in _tensors(self.model, self.optimizer):
            st = t.untyped_storage()
            if st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                total += st.nbytes() if st.device.type == "cuda" else 0
        return total


def gpu_memory_gb() -> dict[str, float]:
    """This process's peak GPU allocation since the last call, and what other processes hold on its GPU.

    Colocated, the other processes on a trainer's GPU are the SGLang engine sharing it: read while
    the engines hold their memory, ``engine_gb`` is the engine side's footprint (SGLang allocates
    weights and its KV cache pool up front, so that is also its peak). Empty without CUDA.
    """
    if not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    free, total = torch.cuda.mem_get_info()
    others = max(0, total - free - torch.cuda.memory_reserved())
    return {"trainer_peak_gb": peak / 2**30, "others_gb": others / 2**30}
