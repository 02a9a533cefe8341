"""The *in* stream: HF directory → this rank's shard of the megatron model (DESIGN §10).

Every rank opens the safetensors shards lazily and, for each parameter it owns, reads only the slice
its TP / EP / PP position needs. Used by ``train --load HF_DIR``, ``--ref-load``, ``heal --load`` and the
converter. Name and layout rules come from ``hf/mapping.py``; this module only reads and slices.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.hf.mapping import (
    build_from_parts,
    get_flavour,
    hf_sources,
    qkv_source_rows,
)
from megatron_mtp_rl.hf.reader import SCALE_SUFFIX, HFCheckpoint, read_hf_config  # noqa: F401
from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.models.state import full_name

_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")

# --------------------------------------------------------------------------------------------
# in: HF → this rank's shard


@dataclass
class LoadReport:
    """What :func:`load_hf` did on this rank."""

    tensors: int
    bytes_read: int
    kept_init: list[str]  # MTP parameters left at megatron's initialisation (allow_missing_mtp)


def _local_tensors(model: torch.nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(local name, PP=1 name with the global expert index, tensor) of every loadable tensor."""
    ep = parallel_state.get_expert_model_parallel_world_size()
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0
    experts = getattr(model.config, "num_moe_experts", None) or 0
    num_local = experts // ep if experts else 0
    for local, t in model.named_parameters():
        name = full_name(model, local)
        m = _LOCAL_EXPERT.search(name)
        if m is not None:
            a, b = m.span(2)
            name = name[:a] + str(ep_rank * num_local + int(m.group(2))) + name[b:]
        yield local, name, t
    for local, buf in model.named_buffers():
        if local.endswith("router.expert_bias"):
            yield local, full_name(model, local), buf


def _partition(param: torch.Tensor, name: str, gated: bool) -> tuple[int, int, int, int] | None:
    """(dim, stride, rank, size) of a TP-split parameter; None when this rank holds it whole."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    expert = _LOCAL_EXPERT.search(name) is not None or ".mlp.experts." in name
    if expert:
        size = parallel_state.get_expert_tensor_parallel_world_size()
        rank = parallel_state.get_expert_tensor_parallel_rank()
    else:
        size = parallel_state.get_tensor_model_parallel_world_size()
        rank = parallel_state.get_tensor_model_parallel_rank()
    if size == 1:
        return None
    stride = getattr(param, "partition_stride", 1)
    if gated and re.search(r"linear_fc1\.(weight|bias)$", name):
        stride = 2  # each rank holds [gate_r; up_r] (see hf_mapping.iter_full_tensors)
    return param.partition_dim, stride, rank, size


def _read_range(ckpt: HFCheckpoint, name: str, dim: int, lo: int, hi: int, pad_rows: bool) -> torch.Tensor:
    """Rows (dim 0) or columns (dim 1) ``[lo, hi)``; with ``pad_rows``, rows past the tensor are zeros."""
    if dim == 0:
        have = ckpt.shape(name)[0]
        if pad_rows and hi > have:
            real = ckpt.read(name, rows=(lo, have)) if lo < have else None
            shape = (hi - max(lo, have), *ckpt.shape(name)[1:])
            zeros = torch.zeros(shape, dtype=ckpt.dtype(name))
            return zeros if real is None else torch.cat((real, zeros), dim=0)
        return ckpt.read(name, rows=(lo, hi))
    if dim == 1:
        return ckpt.read(name, cols=(lo, hi))
    raise ValueError(f"{name}: cannot read a split along dim {dim}")


def _read_split(ckpt: HFCheckpoint, srcs: tuple[str, ...], op: str, full_len: int, part) -> list[torch.Tensor]:
    """This rank's pieces of the HF sources for a parameter split as ``part`` (dim, stride, rank, size).

    Rank r of n holds pieces ``j * n + r`` (j < stride) of the ``n * stride`` equal pieces of the full
    megatron tensor along ``dim``. For ``glu`` the full tensor is ``[gate; up]`` (stride 2: one piece of each).
    """
    dim, stride, rank, size = part
    piece = full_len // (size * stride)
    if op == "glu":
        if dim != 0 or stride != 2:
            raise ValueError(f"{srcs[0]}: SwiGLU fc1 split along dim {dim} with stride {stride} is not a layout")
        lo, hi = rank * piece, (rank + 1) * piece
        return [_read_range(ckpt, s, 0, lo, hi, False) for s in srcs]
    if len(srcs) != 1:
        raise ValueError(f"{srcs}: op {op} with {len(srcs)} sources cannot be split")
    pieces = []
    for j in range(stride):
        q = j * size + rank
        pieces.append(_read_range(ckpt, srcs[0], dim, q * piece, (q + 1) * piece, op == "vocab"))
    return [torch.cat(pieces, dim=dim) if len(pieces) > 1 else pieces[0]]


@torch.no_grad()
def load_hf(
    model: torch.nn.Module,
    hf_dir: str | os.PathLike,
    *,
    family: Any = None,
    allow_missing_mtp: bool = False,
    ckpt: HFCheckpoint | None = None,
) -> LoadReport:
    """Fill this rank's parameters from an HF directory, reading only the slices this rank owns.

    A collective only at the end (every rank's read names are joined to check that the whole
    checkpoint was used). The result equals converting the directory with ``hf-to-mcore`` and
    loading that checkpoint, bit for bit. Raises ``ConfigError`` naming missing or unused tensors.
    """
    from megatron_mtp_rl.hf.families import detect, get_family

    gpt = unwrap(model)
    config = gpt.config
    ckpt = ckpt or HFCheckpoint(hf_dir)
    fam = get_family(family) if family else detect(ckpt.config)
    flavour = get_flavour(fam.flavour)
    tied = bool(getattr(gpt, "share_embeddings_and_output_weights", False))
    gated = bool(config.gated_linear_unit)
    used: set[str] = set()
    missing: list[str] = []
    kept: list[str] = []
    count = 0
    for local, name, param in _local_tensors(gpt):
        try:
            op, srcs = hf_sources(name, config, flavour, tied=tied)
        except KeyError as e:
            raise ConfigError(f"{hf_dir}: {e.args[0]}") from None
        absent = [s for s in srcs if s not in ckpt]
        if absent:
            if allow_missing_mtp and name.startswith("mtp."):
                kept.append(local)
                continue
            missing.extend(absent)
            continue
        used.update(srcs)
        part = _partition(param, name, gated)
        if part is None:
            parts = [ckpt.read(s) for s in srcs]
            if op == "vocab":
                parts = [_pad_to(parts[0], param.shape[0], srcs[0])]
            value = build_from_parts(op, parts, config)
        elif op == "qkv":
            if part[0] != 0:
                raise ValueError(f"{name}: linear_qkv split along dim {part[0]}")
            rows = qkv_source_rows(config, part[2], part[3])
            value = build_from_parts(op, [ckpt.read(s, rows=r) for s, r in zip(srcs, rows)], config, part[3])
        else:
            full_len = param.shape[part[0]] * part[3]
            value = build_from_parts(op, _read_split(ckpt, srcs, op, full_len, part), config)
        if tuple(value.shape) != tuple(param.shape):
            raise ConfigError(
                f"{hf_dir}: {'+'.join(srcs)} gives {tuple(value.shape)} for {name}, this rank's shard is "
                f"{tuple(param.shape)} (does config.json match the tensors?)"
            )
        param.copy_(value)
        count += 1
        del value
    _check_coverage(ckpt, hf_dir, used, missing, config, tied)
    return LoadReport(count, ckpt.stats.bytes, kept)


def _pad_to(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise ConfigError(f"{name} has {t.shape[0]} rows, more than the model's padded vocabulary of {rows}")
    return torch.cat((t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))), dim=0)


def _ignorable(name: str, ckpt: HFCheckpoint, num_layers: int, tied: bool = False) -> bool:
    """HF tensors that carry no parameter of ours: DeepSeek's per-MTP-layer embedding/head copies,
    rotary caches, empty modules (transformers' ``n_shared_experts=0``), and a tied model's explicit
    ``lm_head.weight`` (written for SGLang classes that do not tie)."""
    if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
        return True
    m = re.fullmatch(r"model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight", name)
    if m and int(m.group(1)) >= num_layers:
        return True
    return 0 in ckpt.shape(name)


def _check_coverage(ckpt: HFCheckpoint, hf_dir, used: set[str], missing: list[str], config, tied: bool = False) -> None:
    """Every rank's read names joined: a tensor no rank used means a model that differs from the release."""
    everyone_used, everyone_missing = [used], [missing]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone_used = [None] * dist.get_world_size()
        everyone_missing = [None] * dist.get_world_size()
        dist.all_gather_object(everyone_used, sorted(used))
        dist.all_gather_object(everyone_missing, missing)
    all_used = set().union(*map(set, everyone_used))
    all_missing = sorted(set().union(*map(set, everyone_missing)))
    unused = sorted(n for n in ckpt.names() if n not in all_used and not _ignorable(n, ckpt, config.num_layers, tied))
    problems = []
    if all_missing:
        problems.append(f"model tensors with no HF source ({len(all_missing)}): " + ", ".join(all_missing[:8]))
    if unused:
        problems.append(f"HF tensors our model has no place for ({len(unused)}): " + ", ".join(unused[:8]))
    if problems:
        raise ConfigError(f"{hf_dir}: the checkpoint does not match the model exactly: " + "; ".join(problems))
