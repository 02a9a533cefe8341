"""Lazy reading of an HF safetensors directory: names, shapes, dtypes and slices of one tensor at a time.

The bottom of the HF side (DESIGN §10): :class:`HFCheckpoint` opens the shards with ``safe_open`` and
reads only the rows / columns asked for, dequantising block-fp8 weights (``hf/fp8.py``) on the way.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.hf.directory import INDEX_FILE, is_hf_dir, read_hf_config  # noqa: F401
from megatron_mtp_rl.hf.fp8 import block_size_from_config

SCALE_SUFFIX = "_scale_inv"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


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
            from megatron_mtp_rl.hf.fp8 import dequantize_fp8_blocks, scale_block_range

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
