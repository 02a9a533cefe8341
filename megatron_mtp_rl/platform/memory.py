"""Freed tensors go back to the OS while a weight stream runs (glibc's malloc; elsewhere nothing changes).

glibc serves an allocation at or above its mmap threshold from a fresh mapping that ``free`` unmaps,
and one below it from the heap, which keeps what is freed. The threshold is dynamic: freeing a
mapped block raises it to that block's size (up to 32 MiB). A weight push or export frees one
gathered tensor after another, and after the first the rest (expert weights of a few MiB) come from
the heap; interleaved with gloo's gather buffers the heap fragments and the process keeps growing
with the model (measured: 0.8x the model's bytes at EP=2, tools/bench_scale.py). While a stream runs
the threshold is fixed low, so every freed tensor is unmapped; afterwards it is set to the dynamic
rule's ceiling (and the trim threshold to twice that, as the dynamic rule does), which training's
steady state reaches anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_STREAM_THRESHOLD = 128 << 10  # glibc's initial threshold
_CEILING = 32 << 20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
_depth = 0


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _libc()


@contextlib.contextmanager
def freed_tensors_return_to_os() -> Iterator[None]:
    """Within: large blocks are mapped and unmapped, not kept in the heap (nested use is fine)."""
    global _depth
    if _LIBC is None:
        yield
        return
    _depth += 1
    if _depth == 1:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, _STREAM_THRESHOLD)
        _LIBC.malloc_trim(0)  # what the heap already keeps
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, _CEILING)
            _LIBC.mallopt(_M_TRIM_THRESHOLD, 2 * _CEILING)
            _LIBC.malloc_trim(0)
