"""Our dist checkpoint read into a model built on the meta device, one group of parameters at a time.

``mcore-to-hf`` needs each parameter once, in order. Loading the whole model first made its peak the
model's bytes plus the shards being written; here each group of at most ``group_bytes`` is allocated,
read from the checkpoint (only the regions this rank's parameters own, through torch's DCP reader with
megatron-core's sharded state dict and factories: no collective, any parallel layout), handed out, and
dropped before the next group is read. The peak is one group plus what the consumer keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_mtp_rl.models.bucketing import iter_buckets
from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.train.checkpoint import CheckpointError


class _RegionPlanner(LoadPlanner):
    """Reads given regions of checkpoint tensors into given tensors (DCP's resharding, this process only)."""

    def __init__(self, regions: dict[tuple[str, tuple[int, ...]], torch.Tensor]) -> None:
        self.regions = regions

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False, **_) -> None:
        self.metadata = metadata

    def create_local_plan(self) -> LoadPlan:
        items: list[ReadItem] = []
        for (key, offsets), dest in self.regions.items():
            md = self.metadata.state_dict_metadata.get(key)
            if md is None:
                raise CheckpointError(f"checkpoint has no tensor {key}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(key, md, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        return global_plan

    def finish_plan(self, central_plan: LoadPlan) -> LoadPlan:
        return central_plan

    def load_bytes(self, read_item: ReadItem, value) -> None:  # only tensors are asked for
        raise CheckpointError(f"unexpected non-tensor item {read_item.dest_index.fqn}")

    def resolve_tensor(self, read_item: ReadItem) -> torch.Tensor:
        dest = self.regions[(read_item.dest_index.fqn, tuple(read_item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            if length < dest.shape[dim]:
                dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item: ReadItem, tensor: torch.Tensor) -> None:
        pass  # read in place


class _CachedReader(FileSystemReader):
    """DCP's file reader that unpickles the checkpoint's metadata once, not once per group."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        if self._metadata is None:
            self._metadata = super().read_metadata(*args, **kwargs)
        return self._metadata


class _RegionLoad:
    """A megatron-core load strategy that reads exactly the ShardedTensors it is given (no collective).

    megatron-core's own strategy describes each key's whole shard grid to torch and so needs every
    local shard of a key in one call; a group of parameters holds only some of them.
    """

    def __init__(self, path: Path) -> None:
        self.reader = _CachedReader(str(path))

    def load(self, sharded_state_dict: dict, checkpoint_dir, async_strategy: str = "mcore") -> dict:
        regions: dict[tuple[str, tuple[int, ...]], torch.Tensor] = {}
        for sh in nested_values(sharded_state_dict):
            if not isinstance(sh, ShardedTensor) or sh.flattened_range is not None:
                raise CheckpointError(f"cannot stream {getattr(sh, 'key', sh)!r} (not a plain sharded tensor)")
            if not sh.data.is_contiguous():
                sh.data = sh.data.contiguous()  # read into a copy; the caller copies it into the parameter
            shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
            regions[(sh.key, tuple(sh.global_offset))] = sh.data.view(shape)
        dcp_load({}, storage_reader=self.reader, planner=_RegionPlanner(regions), no_dist=True)
        return dict_list_map_inplace(lambda sh: sh.data, sharded_state_dict)


def _swap_in(model: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> torch.Tensor:
    """Put ``tensor`` (or, None, a fresh empty CPU tensor like the current one) at ``name``; returns the old one.

    A parameter keeps its megatron attributes (``tensor_model_parallel``, ``partition_dim`` ...).
    """
    prefix, _, attr = name.rpartition(".")
    module = model.get_submodule(prefix)
    slots = module._parameters if attr in module._parameters else module._buffers
    old = slots[attr]
    if tensor is None:
        tensor = torch.empty(old.shape, dtype=old.dtype, device="cpu")
        if isinstance(old, torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=False)
            tensor.__dict__.update(old.__dict__)
    slots[attr] = tensor
    return old


def stream_checkpoint(
    model: torch.nn.Module, path: str | Path, named: Iterable[tuple[str, torch.Tensor]], group_bytes: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``named``'s tensors of a meta-device ``model`` (its state-dict names) loaded from checkpoint ``path``.

    Loads ``group_bytes`` at a time (a larger tensor alone); a group's tensors are put back on the meta
    device once the consumer asks for the next group, so keep a copy of what must outlive that.
    Refuses NaN/inf as :func:`~megatron_mtp_rl.train.checkpoint.load_checkpoint` does.
    """
    gpt = unwrap(model)
    strategy = _RegionLoad(Path(path))
    for group in iter_buckets(list(named), group_bytes):
        names = [n for n, _ in group]
        metas = {n: _swap_in(gpt, n, None) for n in names}
        try:
            sharded = gpt.sharded_state_dict()
            missing = [n for n in names if not isinstance(sharded.get(n), (ShardedTensor, ShardedTensorFactory))]
            if missing:
                raise CheckpointError(f"cannot stream {missing[0]}: not in the model's sharded state dict")
            loaded = dist_checkpointing.load(
                {"model": {n: sharded[n] for n in names}},
                str(path),
                sharded_strategy=strategy,
                validate_access_integrity=False,
            )["model"]
            del sharded
            current = dict(gpt.named_parameters()) | dict(gpt.named_buffers())
            for n in names:
                dest, got = current[n], loaded[n]
                if got.data_ptr() != dest.data_ptr():  # a factory's merge (e.g. SwiGLU's gate/up) built a new one
                    with torch.no_grad():
                        dest.copy_(got)
                if not _finite(dest.detach()):
                    raise CheckpointError(f"parameter {n} holds NaN/inf after the load")
            del loaded, current
            for n in names:
                yield n, _param(gpt, n)
        finally:
            for n, meta in metas.items():
                _swap_in(gpt, n, meta)


def _finite(t: torch.Tensor) -> bool:
    """No NaN/inf: the extremes carry both (a reduction, ~25x faster than ``isfinite().all()`` on bf16 CPU)."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _param(model: torch.nn.Module, name: str) -> torch.Tensor:
    prefix, _, attr = name.rpartition(".")
    module = model.get_submodule(prefix)
    return module._parameters[attr] if attr in module._parameters else module._buffers[attr]
