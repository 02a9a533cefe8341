"""Block-quantised fp8 weights in DeepSeek-V3's release format, dequantised to bf16 on load.

DeepSeek-V3 / R1 (and Qwen3-*-FP8, GLM-4.5-FP8) ship each 2-D linear weight as ``float8_e4m3fn``
plus ``<name>_scale_inv``: fp32 of shape ``[ceil(R/bR), ceil(C/bC)]``, one multiplier per
``bR x bC`` block (``weight_block_size`` in config.json's ``quantization_config``, 128 x 128). The
bf16 value is ``fp8.float() * scale_inv[i // bR, j // bC]`` (DeepSeek's ``weight_dequant``).

A tensor-parallel rank reads only its slice of a weight: the rows ``[r0, r1)`` and columns
``[c0, c1)`` need the scale rows ``scale_block_range(r0, r1, bR)`` and columns
``scale_block_range(c0, c1, bC)``; :func:`dequantize_fp8_blocks` takes that slice and those scales
with ``row_start=r0, col_start=c0`` and gives bit for bit the same values as the full dequantisation.
"""

from __future__ import annotations

from typing import Any

import torch

from megatron_mtp_rl.errors import UnsupportedCheckpoint

FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)


def scale_block_range(start: int, stop: int, block: int) -> tuple[int, int]:
    """The scale indices ``[first, last)`` covering elements ``[start, stop)`` of one weight dimension."""
    if not 0 <= start <= stop:
        raise ValueError(f"bad slice [{start}, {stop})")
    return start // block, -(-stop // block)


def dequantize_fp8_blocks(
    weight_fp8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    *,
    row_start: int = 0,
    col_start: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """``weight_fp8`` (the rows/cols of the full weight starting at ``row_start``/``col_start``) in ``dtype``.

    ``scale_inv`` holds the scale blocks that slice touches (see :func:`scale_block_range`), the
    whole scale tensor for a whole weight. Works one block-row at a time, so the extra memory is
    one ``bR x C`` fp32 strip, not an fp32 copy of the weight.
    """
    if weight_fp8.dim() != 2 or scale_inv.dim() != 2:
        raise ValueError(f"fp8 block dequantisation needs 2-D tensors, got {tuple(weight_fp8.shape)}")
    rows, cols = weight_fp8.shape
    br, bc = block
    r0, r1 = scale_block_range(row_start, row_start + rows, br)
    c0, c1 = scale_block_range(col_start, col_start + cols, bc)
    if tuple(scale_inv.shape) != (r1 - r0, c1 - c0):
        raise ValueError(
            f"scale_inv {tuple(scale_inv.shape)} does not cover weight rows [{row_start}, {row_start + rows}) "
            f"cols [{col_start}, {col_start + cols}) in {br}x{bc} blocks (needs {(r1 - r0, c1 - c0)})"
        )
    scale = scale_inv.float()
    # per column of the slice: which scale column multiplies it
    col_block = (torch.arange(col_start, col_start + cols, device=weight_fp8.device) // bc) - c0
    out = torch.empty((rows, cols), dtype=dtype, device=weight_fp8.device)
    for b in range(r1 - r0):
        lo = max((r0 + b) * br - row_start, 0)
        hi = min((r0 + b + 1) * br - row_start, rows)
        out[lo:hi] = (weight_fp8[lo:hi].float() * scale[b][col_block]).to(dtype)
    return out


def quantize_fp8_blocks(
    weight: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float8_e4m3fn weight, fp32 scale_inv)`` with DeepSeek's per-block scale ``amax / 448``.

    For tests and benchmarks (releases come quantised); an all-zero block gets a tiny scale, not 0/0.
    """
    if weight.dim() != 2:
        raise ValueError(f"fp8 block quantisation needs a 2-D weight, got {tuple(weight.shape)}")
    rows, cols = weight.shape
    br, bc = block
    nr, nc = -(-rows // br), -(-cols // bc)
    padded = torch.zeros((nr * br, nc * bc), dtype=torch.float32, device=weight.device)
    padded[:rows, :cols] = weight.float()
    blocks = padded.view(nr, br, nc, bc)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(nr * br, nc * bc)[:rows, :cols].contiguous(), scale


def block_size_from_config(cfg: dict[str, Any]) -> tuple[int, int] | None:
    """``quantization_config.weight_block_size`` of an HF config.json, None when not quantised.

    Only DeepSeek-V3's block fp8 (``quant_method: fp8``, ``fmt: e4m3``; releases without ``fmt``
    are e4m3) is read; any other quantisation is refused in one line.
    """
    q = cfg.get("quantization_config")
    if not q:
        return None
    method, fmt, size = q.get("quant_method"), q.get("fmt", "e4m3"), q.get("weight_block_size")
    if method != "fp8" or fmt != "e4m3":
        raise UnsupportedCheckpoint(
            f"quantization_config quant_method={method!r} fmt={fmt!r}: only block fp8 (quant_method 'fp8', "
            "fmt 'e4m3', DeepSeek-V3's format) is dequantised; convert the checkpoint to bf16 first"
        )
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(x, int) and x > 0 for x in size)):
        raise UnsupportedCheckpoint(
            f"quantization_config weight_block_size={size!r}: only per-block fp8 scales ([rows, cols]) are read"
        )
    return int(size[0]), int(size[1])
