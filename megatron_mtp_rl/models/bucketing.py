"""Group named tensors into size-bounded buckets for weight sync.

Weight sync to a rollout engine sends parameters a bucket at a time so that the extra memory
(a flattened copy, a NCCL/IPC buffer) stays bounded by ``--update-weight-buffer-size``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

import torch

#: Default for ``--update-weight-buffer-size``: 512 MiB.
DEFAULT_UPDATE_WEIGHT_BUFFER_SIZE = 512 * 1024**2


def tensor_nbytes(tensor: torch.Tensor) -> int:
    """Bytes the tensor's elements occupy (what a flat send buffer needs), not its storage."""
    return tensor.numel() * tensor.element_size()


def iter_buckets(
    named: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    max_bytes: int = DEFAULT_UPDATE_WEIGHT_BUFFER_SIZE,
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield buckets lazily, so a caller can gather, send and free one bucket at a time.

    Same contract as :func:`bucket_named_tensors`.
    """
    if max_bytes <= 0:
        raise ValueError(f"the bucket size must be positive, got {max_bytes} bytes")
    items = named.items() if isinstance(named, Mapping) else named
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in items:
        nbytes = tensor_nbytes(tensor)
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


def bucket_named_tensors(
    named: Iterable[tuple[str, torch.Tensor]] | Mapping[str, torch.Tensor],
    max_bytes: int = DEFAULT_UPDATE_WEIGHT_BUFFER_SIZE,
) -> list[list[tuple[str, torch.Tensor]]]:
    """Split ``named`` into consecutive buckets of at most ``max_bytes`` bytes each.

    Every tensor appears exactly once and the input order is kept (buckets are consecutive
    runs). A tensor larger than ``max_bytes`` cannot be split by name, so it gets a bucket of
    its own, which is then the only bucket above the limit. Sizes count element bytes
    (``numel * element_size``), not shared or padded storage. No bucket is empty.
    """
    return list(iter_buckets(named, max_bytes))
