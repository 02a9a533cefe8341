"""HF safetensors shards of at most ``--max-shard-size``, each written as soon as it fills, plus the index."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.hf.directory import INDEX_FILE
from megatron_mtp_rl.hf.export import is_stage_sender, iter_hf_tensors

# --------------------------------------------------------------------------------------------
# HF shards, written as they fill


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """``5GB`` (HF's spelling: 10^9), ``512MiB``, ``1000`` → bytes; ValueError on anything else."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 5GB, 500MB, 512MiB)")
    value = float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()]
    if value < 1:
        raise ValueError(f"{text!r}: a size must be at least one byte")
    return int(value)


class HFShardWriter:
    """Writes HF tensors into safetensors shards of at most ``max_shard_bytes``, each as soon as it fills.

    Shards are first written under temporary names (``.part``); :func:`finalize_shards` gives them
    HF's ``model-0000k-of-0000n.safetensors`` names and writes ``model.safetensors.index.json`` once
    every stage is done. A tensor larger than the limit gets a shard of its own. Memory: one shard
    being filled plus safetensors' serialisation of it.
    """

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int, *, tag: str = "s0") -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.max = max_shard_bytes
        self.tag = tag
        self.parts: list[tuple[str, list[str], int]] = []  # (temp file name, tensor names, bytes)
        self._buf: dict[str, torch.Tensor] = {}
        self._size = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        t = tensor.detach().to("cpu", target, copy=True).contiguous()  # owned: the source may alias a parameter
        n = t.numel() * t.element_size()
        if self._buf and self._size + n > self.max:
            self.flush()
        self._buf[name] = t
        self._size += n

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self._buf:
            return
        fname = f".{self.tag}-{len(self.parts):05d}.safetensors.part"
        save_file(self._buf, str(self.out / fname), metadata={"format": "pt"})
        self.parts.append((fname, list(self._buf), self._size))
        self._buf, self._size = {}, 0

    def close(self) -> list[tuple[str, list[str], int]]:
        self.flush()
        return self.parts


def finalize_shards(out_dir: str | os.PathLike, parts: list[tuple[str, list[str], int]]) -> list[str]:
    """Rename every stage's ``.part`` files, in order, to HF's shard names and write the index.

    One part becomes ``model.safetensors`` (no index), as ``save_pretrained`` does.
    """
    out = Path(out_dir)
    for old in out.glob("model*.safetensors"):
        old.unlink()
    (out / INDEX_FILE).unlink(missing_ok=True)
    if len(parts) == 1:
        (out / parts[0][0]).rename(out / "model.safetensors")
        return ["model.safetensors"]
    n = len(parts)
    weight_map: dict[str, str] = {}
    names = []
    for k, (tmp, tensors, _) in enumerate(parts, start=1):
        final = f"model-{k:05d}-of-{n:05d}.safetensors"
        (out / tmp).rename(out / final)
        names.append(final)
        for t in tensors:
            weight_map[t] = final
    index = {"metadata": {"total_size": sum(p[2] for p in parts)}, "weight_map": dict(sorted(weight_map.items()))}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return names


def write_hf_shards(
    model: torch.nn.Module,
    model_args: Any,
    family: Any,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int,
    depth: int | None = None,
    with_copies: bool = False,
    dtype: torch.dtype | None = None,
    tensors: Iterable[tuple[str, torch.Tensor]] | None = None,
) -> list[str]:
    """Stream this model into HF shards (a collective): each stage's sender writes its own stage.

    The part lists are joined over the world (names only) and global rank 0 names the shards and
    writes the index. Returns the shard file names (on every rank). ``tensors``: the stage's tensors
    from elsewhere than the model (``hf.export.iter_hf_tensors``).
    """
    sender = is_stage_sender()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if dist.is_initialized() else 0
    writer = HFShardWriter(out_dir, max_shard_bytes, tag=f"s{pp_rank}") if sender else None
    for name, t in iter_hf_tensors(model, model_args, family, depth=depth, with_copies=with_copies, tensors=tensors):
        if writer is not None:
            writer.add(name, t, dtype)
    parts = writer.close() if writer is not None else []
    every = [(pp_rank, parts)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (pp_rank, parts) if sender else None)
        every = [g for g in gathered if g is not None]
    ordered = [p for _, stage_parts in sorted(every, key=lambda x: x[0]) for p in stage_parts]
    names: list = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        names = [finalize_shards(out_dir, ordered)]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(names, src=0)
    return names[0]
