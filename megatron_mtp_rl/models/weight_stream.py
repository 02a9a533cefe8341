"""Weights between an HF safetensors directory and the sharded megatron model, one tensor at a time.

Two streams, and every path that moves weights uses one of them (DESIGN §10):

* **in** — :func:`load_hf`: every rank opens the safetensors shards lazily and, for each parameter
  it owns, reads only the slice its TP / EP / PP position needs (``safe_open`` + ``get_slice``),
  dequantising block-fp8 weights on the way. Used by ``train --load HF_DIR``, ``--ref-load``,
  ``heal --load`` and the converter.
* **out** — :func:`iter_hf_tensors`: a generator over this pipeline stage's parameters that
  gathers ONE parameter over its own TP / EP group, maps it to HF names and yields it. Weight
  sync fills buckets from it; :class:`HFShardWriter` writes HF shards of ``--max-shard-size``.

At no point does a process hold the whole model, and no stage's tensors travel to another
stage. The name and layout rules live in ``models/hf_mapping.py`` (:func:`hf_sources`,
:func:`build_from_parts`) and the families; this module only reads, slices, gathers and writes.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.models.hf_dir import INDEX_FILE, is_hf_dir  # noqa: F401 (re-exported)
from megatron_mtp_rl.models.hf_mapping import (
    build_from_parts,
    get_flavour,
    hf_sources,
    iter_full_tensors,
    megatron_tensor_to_hf,
    qkv_source_rows,
)
from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.models.state import full_name

SCALE_SUFFIX = "_scale_inv"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")


def read_hf_config(hf_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found: an HF checkpoint directory needs its config.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


# --------------------------------------------------------------------------------------------
# Reading


@dataclass
class ReadStats:
    """What a reader read: bytes (as stored) and how often each tensor was opened."""

    bytes: int = 0
    reads: dict[str, int] = field(default_factory=dict)


class HFCheckpoint:
    """Lazy view of an HF safetensors directory (one file, or shards + ``model.safetensors.index.json``).

    Nothing is read until :meth:`read`, and then only the requested rows / columns: the shard is
    memory-mapped for the one call and unmapped afterwards, so resident memory follows what was
    asked for, not the file. Block-quantised fp8 weights (``<name>`` in ``float8_e4m3fn`` with
    ``<name>_scale_inv``; DeepSeek-V3's layout) come back dequantised to bf16.
    """

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        from safetensors import safe_open

        self.dir = Path(hf_dir)
        self.config = read_hf_config(hf_dir)
        self._files: dict[str, str] = {}
        index = self.dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            for name, fname in weight_map.items():
                if not (self.dir / fname).is_file():
                    raise ConfigError(f"{index}: {name} is in {fname}, which is not in {self.dir}")
                self._files[name] = str(self.dir / fname)
        else:
            files = sorted(self.dir.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"no *.safetensors file in {self.dir}")
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for name in h.keys():
                        if name in self._files:
                            raise ConfigError(f"{name} appears in more than one safetensors file of {self.dir}")
                        self._files[name] = str(f)
        self._meta: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
        self.stats = ReadStats()
        self.block = _fp8_block(self.config) if self._has_fp8_names() else None

    def _has_fp8_names(self) -> bool:
        return any(n.endswith(SCALE_SUFFIX) for n in self._files)

    def _load_meta(self) -> None:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name, f in self._files.items():
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            with safe_open(f, framework="pt") as h:
                for name in names:
                    sl = h.get_slice(name)
                    self._meta[name] = (_SAFETENSORS_DTYPES[sl.get_dtype()], tuple(sl.get_shape()))

    def _info(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        if not self._meta:
            self._load_meta()
        if name not in self._meta:
            raise KeyError(name)
        return self._meta[name]

    def names(self) -> list[str]:
        """Tensor names, without the fp8 scale tensors (they are part of their weight)."""
        return [n for n in self._files if not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in self._files)]

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name)[1]

    def stored_dtype(self, name: str) -> torch.dtype:
        return self._info(name)[0]

    def dtype(self, name: str) -> torch.dtype:
        """The dtype :meth:`read` returns (fp8 weights come back as bf16)."""
        d = self.stored_dtype(name)
        return torch.bfloat16 if d in _FP8 and self.is_quantized(name) else d

    def is_quantized(self, name: str) -> bool:
        return name + SCALE_SUFFIX in self._files

    def nbytes(self, name: str) -> int:
        dtype, shape = self._info(name)
        n = 1
        for s in shape:
            n *= s
        return n * torch.empty((), dtype=dtype).element_size()

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
        """Rows ``[r0, r1)`` and columns ``[c0, c1)`` of one tensor (default: all), as an owned tensor."""
        if name not in self._files:
            raise KeyError(name)
        t = self._read_raw(name, rows, cols)
        if t.dtype in _FP8 and self.is_quantized(name):
            from megatron_mtp_rl.models.fp8 import dequantize_fp8_blocks, scale_block_range

            if self.block is None:
                raise ConfigError(f"{self.dir}: {name} is fp8 with a scale but config.json has no weight_block_size")
            br, bc = self.block
            r0 = rows[0] if rows else 0
            c0 = cols[0] if cols else 0
            r1 = rows[1] if rows else self.shape(name)[0]
            c1 = cols[1] if cols else self.shape(name)[1]
            srows = scale_block_range(r0, r1, br)
            scols = scale_block_range(c0, c1, bc)
            scale = self._read_raw(name + SCALE_SUFFIX, srows, scols)
            t = dequantize_fp8_blocks(t, scale, (br, bc), row_start=r0, col_start=c0)
        return t

    def _read_raw(self, name: str, rows, cols) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(self._files[name], framework="pt") as h:
            sl = h.get_slice(name)
            ndim = len(sl.get_shape())
            if rows is None and cols is None:
                t = sl[:] if ndim else h.get_tensor(name)
            elif ndim == 1:
                t = sl[rows[0] : rows[1]]
            else:
                r = slice(*rows) if rows else slice(None)
                c = slice(*cols) if cols else slice(None)
                t = sl[r, c]
            t = t.clone()  # own the memory before the mapping goes away
        self.stats.bytes += t.numel() * t.element_size()
        self.stats.reads[name] = self.stats.reads.get(name, 0) + 1
        return t


def _fp8_block(cfg: dict[str, Any]) -> tuple[int, int] | None:
    from megatron_mtp_rl.models.fp8 import block_size_from_config

    return block_size_from_config(cfg)


def dominant_dtype(ckpt: HFCheckpoint) -> str:
    """``bf16`` or ``fp32``: the floating dtype holding most of the bytes (fp8 counts as the bf16 it becomes).

    Releases mix dtypes (GLM-4.5 and DeepSeek-V3 keep the router's ``e_score_correction_bias`` in
    fp32 beside bf16 weights); megatron keeps that bias in fp32 whatever the parameter dtype.
    """
    totals: dict[torch.dtype, int] = {}
    for name in ckpt.names():
        d = ckpt.dtype(name)
        if d.is_floating_point:
            n = 1
            for s in ckpt.shape(name):
                n *= s
            totals[d] = totals.get(d, 0) + n * torch.empty((), dtype=d).element_size()
    if not totals:
        raise ConfigError(f"{ckpt.dir}: no floating-point tensors")
    best = max(totals, key=totals.get)
    if best == torch.bfloat16:
        return "bf16"
    if best == torch.float32:
        return "fp32"
    raise ConfigError(f"{ckpt.dir}: most weights are {best}; pass --dtype fp32 or --dtype bf16")


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
    from megatron_mtp_rl.models.families import detect, get_family

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
    _check_coverage(ckpt, hf_dir, used, missing, config)
    return LoadReport(count, ckpt.stats.bytes, kept)


def _pad_to(t: torch.Tensor, rows: int, name: str) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    if t.shape[0] > rows:
        raise ConfigError(f"{name} has {t.shape[0]} rows, more than the model's padded vocabulary of {rows}")
    return torch.cat((t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))), dim=0)


def _ignorable(name: str, ckpt: HFCheckpoint, num_layers: int) -> bool:
    """HF tensors that carry no parameter of ours: DeepSeek's per-MTP-layer embedding/head copies,
    rotary caches, empty modules (transformers' ``n_shared_experts=0``)."""
    if name.endswith("rotary_emb.inv_freq"):
        return True
    m = re.fullmatch(r"model\.layers\.(\d+)\.(embed_tokens|shared_head\.head)\.weight", name)
    if m and int(m.group(1)) >= num_layers:
        return True
    return 0 in ckpt.shape(name)


def _check_coverage(ckpt: HFCheckpoint, hf_dir, used: set[str], missing: list[str], config) -> None:
    """Every rank's read names joined: a tensor no rank used means a model that differs from the release."""
    everyone_used, everyone_missing = [used], [missing]
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone_used = [None] * dist.get_world_size()
        everyone_missing = [None] * dist.get_world_size()
        dist.all_gather_object(everyone_used, sorted(used))
        dist.all_gather_object(everyone_missing, missing)
    all_used = set().union(*map(set, everyone_used))
    all_missing = sorted(set().union(*map(set, everyone_missing)))
    unused = sorted(n for n in ckpt.names() if n not in all_used and not _ignorable(n, ckpt, config.num_layers))
    problems = []
    if all_missing:
        problems.append(f"model tensors with no HF source ({len(all_missing)}): " + ", ".join(all_missing[:8]))
    if unused:
        problems.append(f"HF tensors our model has no place for ({len(unused)}): " + ", ".join(unused[:8]))
    if problems:
        raise ConfigError(f"{hf_dir}: the checkpoint does not match the model exactly: " + "; ".join(problems))


# --------------------------------------------------------------------------------------------
# out: this stage → HF tensors, one parameter at a time


def is_stage_sender() -> bool:
    """The one rank per pipeline stage that consumes the stream (first DP and TP rank of its stage)."""
    if not dist.is_initialized():
        return True
    return parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0


_MTP_LAYER = re.compile(r"mtp\.layers\.(\d+)\.")


def iter_hf_tensors(
    model: torch.nn.Module,
    model_args: Any,
    family: Any,
    *,
    depth: int | None = None,
    with_copies: bool = False,
    complete: bool = True,
) -> Iterator[tuple[str, torch.Tensor]]:
    """This pipeline stage's weights as HF ``(name, tensor)`` pairs, gathered one parameter at a time.

    A collective over each parameter's TP / EP group: every rank of the stage runs it to the end
    (ranks that are not :func:`is_stage_sender` just drop what they get). Tensors may alias the
    parameters: copy what must outlive the next optimizer step. The first stage owns the word
    embedding; a later stage's tied copy is skipped. ``depth``: MTP layers to include (default: what
    the family's SGLang draft takes). ``complete``: add the zero tensors the HF architecture always
    has and our model may leave out (the family's rule), at the end of the stage.
    """
    from dataclasses import replace

    from megatron_mtp_rl.models.families import family_for

    gpt = unwrap(model)
    fam = family_for(model_args, family)
    depth = fam.export_depth(model_args) if depth is None else depth
    flavour = fam.flavour
    if flavour.mtp_embed_head_copies and not with_copies:
        flavour = replace(flavour, mtp_embed_head_copies=False)
    tied = not model_args.untie_embeddings_and_output_weights
    first_stage = not dist.is_initialized() or parallel_state.is_pipeline_first_stage(ignore_virtual=True)
    seen: dict[str, torch.Tensor] = {}
    for name, t in iter_full_tensors(gpt):
        if name.startswith("embedding.") and not first_stage:
            continue
        m = _MTP_LAYER.match(name)
        if m is not None and int(m.group(1)) >= depth:
            continue
        if name == "output_layer.weight" and tied:
            continue
        for hf_name, x in megatron_tensor_to_hf(
            name, t, gpt.config, flavour, tied=tied, hf_vocab_size=model_args.vocab_size
        ):
            seen[hf_name] = torch.empty(x.shape, dtype=x.dtype, device="meta")
            yield hf_name, x
    if complete:
        for hf_name, meta in fam.complete(dict(seen), model_args, depth).items():
            if hf_name not in seen:
                yield hf_name, torch.zeros(meta.shape, dtype=meta.dtype)


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
) -> list[str]:
    """Stream this model into HF shards (a collective): each stage's sender writes its own stage.

    The part lists are joined over the world (names only) and global rank 0 names the shards and
    writes the index. Returns the shard file names (on every rank).
    """
    sender = is_stage_sender()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if dist.is_initialized() else 0
    writer = HFShardWriter(out_dir, max_shard_bytes, tag=f"s{pp_rank}") if sender else None
    for name, t in iter_hf_tensors(model, model_args, family, depth=depth, with_copies=with_copies):
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
