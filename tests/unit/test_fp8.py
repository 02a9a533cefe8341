"""hf/fp8.py: DeepSeek-V3's block fp8 (float8_e4m3fn + per-block ``weight_scale_inv``) on CPU."""

from __future__ import annotations

import pytest
import torch

from megatron_mtp_rl.hf.families.base import UnsupportedCheckpoint
from megatron_mtp_rl.hf.fp8 import (
    block_size_from_config,
    dequantize_fp8_blocks,
    quantize_fp8_blocks,
    scale_block_range,
)

SHAPE = (300, 200)  # neither dimension a multiple of the block: partial edge blocks


@pytest.fixture(scope="module")
def weight():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=g) * torch.logspace(-3, 0, SHAPE[1])  # blocks of very different scales
    w[:128, :128] = 0  # an all-zero block
    return w.to(torch.bfloat16)


@pytest.mark.parametrize("block", [(128, 128), (64, 48)])
def test_dequant_of_quant_is_within_fp8_rounding(weight, block):
    q, scale_inv = quantize_fp8_blocks(weight, block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == weight.shape
    assert scale_inv.dtype == torch.float32
    assert scale_inv.shape == (-(-SHAPE[0] // block[0]), -(-SHAPE[1] // block[1]))
    # DeepSeek's scale: amax / 448 per block (the last, partial block here)
    w = weight.float()
    last = w[(scale_inv.shape[0] - 1) * block[0] :, (scale_inv.shape[1] - 1) * block[1] :]
    assert scale_inv[-1, -1].item() == pytest.approx(last.abs().max().item() / 448, rel=1e-6)
    deq = dequantize_fp8_blocks(q, scale_inv, block)
    assert deq.dtype == torch.bfloat16 and deq.shape == weight.shape
    # e4m3: 3 mantissa bits (relative 2^-4 at round-to-nearest), subnormal step 2^-9 x scale; then bf16 (2^-9)
    per_elem = scale_inv.repeat_interleave(block[0], 0)[: SHAPE[0]].repeat_interleave(block[1], 1)[:, : SHAPE[1]]
    bound = w.abs() * (2**-4 + 2**-8) + per_elem * 2**-9
    err = (deq.float() - w).abs()
    assert (err <= bound).all(), (err - bound).max()
    assert torch.equal(deq[:128, :128], torch.zeros(128, 128, dtype=torch.bfloat16))
    # and it is DeepSeek's formula: fp8.float() * scale_inv[block], rounded once to bf16
    assert torch.equal(deq, (q.float() * per_elem).to(torch.bfloat16))
    assert (err > 0).any()  # it really was quantised


@pytest.mark.parametrize("rows,cols", [((0, 300), (0, 200)), ((50, 270), (100, 190)), ((128, 256), (5, 6))])
def test_slice_dequant_equals_slice_of_full_dequant(weight, rows, cols):
    block = (128, 128)
    q, scale_inv = quantize_fp8_blocks(weight, block)
    full = dequantize_fp8_blocks(q, scale_inv, block)
    (r0, r1), (c0, c1) = rows, cols
    sr, sc = scale_block_range(r0, r1, block[0]), scale_block_range(c0, c1, block[1])
    part = dequantize_fp8_blocks(
        q[r0:r1, c0:c1], scale_inv[sr[0] : sr[1], sc[0] : sc[1]], block, row_start=r0, col_start=c0
    )
    assert torch.equal(part, full[r0:r1, c0:c1])


def test_scale_block_range_and_a_wrong_scale_slice():
    assert scale_block_range(0, 300, 128) == (0, 3)
    assert scale_block_range(128, 256, 128) == (1, 2)
    assert scale_block_range(127, 129, 128) == (0, 2)
    q, scale_inv = quantize_fp8_blocks(torch.ones(256, 256), (128, 128))
    with pytest.raises(ValueError, match="does not cover"):
        dequantize_fp8_blocks(q[128:], scale_inv, (128, 128), row_start=128)  # the full scale, not its rows


def test_block_size_from_config():
    assert block_size_from_config({"hidden_size": 8}) is None
    deepseek = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert block_size_from_config({"quantization_config": deepseek}) == (128, 128)
    no_fmt = {"quant_method": "fp8", "weight_block_size": [64, 32]}  # Qwen3-*-FP8 write no fmt
    assert block_size_from_config({"quantization_config": no_fmt}) == (64, 32)
    for bad, words in (
        ({"quant_method": "awq", "bits": 4}, "quant_method='awq'"),
        (deepseek | {"fmt": "e5m2"}, "fmt='e5m2'"),
        ({"quant_method": "fp8"}, "weight_block_size=None"),
    ):
        with pytest.raises(UnsupportedCheckpoint, match=words) as e:
            block_size_from_config({"quantization_config": bad})
        assert "\n" not in str(e.value)
