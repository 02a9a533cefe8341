"""hf/load.py + hf/export.py in one process: HF shards out, mixed-dtype and block-fp8 releases in.

* ``mcore-to-hf`` streams into shards of ``--max-shard-size`` + ``model.safetensors.index.json``; the
  tensors equal the whole-model export (``weight_sync.hf_tensors``) tensor for tensor, and transformers
  loads the directory.
* A GLM-4.5-shaped release (bf16 weights, fp32 router bias) converts under ``--dtype auto`` as bf16 with
  the bias kept fp32.
* A block-fp8 release (DeepSeek-V3's layout) reads back as the dequantised values, each within fp8's
  rounding of the bf16 weights it was made from; it converts and loads directly to the same model.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.hf_release import make_release
from tests.tool_loader import load_tool

GLM = dict(hidden=64, layers=2, experts=4, mtp_layers=1, shards=3, seed=11)


@pytest.fixture(scope="module")
def glm(tmp_path_factory, single_process):
    root = tmp_path_factory.mktemp("glm")
    hf = make_release(root / "hf", "glm4_moe", **GLM)
    load_tool("convert_checkpoint").hf_to_mcore(hf, root / "mcore")  # --dtype auto
    return root


def test_mixed_release_converts_under_auto_dtype_keeping_the_fp32_router_bias(glm):
    from megatron_mtp_rl.hf.reader import HFCheckpoint, dominant_dtype
    from megatron_mtp_rl.train.saved_args import saved_model_args

    ckpt = HFCheckpoint(glm / "hf")
    assert {ckpt.dtype(n) for n in ckpt.names()} == {torch.bfloat16, torch.float32}  # as GLM-4.5 ships
    assert dominant_dtype(ckpt) == "bf16"
    assert saved_model_args(str(glm / "mcore"))["params_dtype"] == "bf16"
    assert saved_model_args(str(glm / "hf"))["params_dtype"] == "bf16"  # train --load HF_DIR reads the same


def test_streamed_export_in_shards_equals_the_whole_model_export(glm, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from megatron_mtp_rl import platform
    from megatron_mtp_rl.cluster.weight_sync import hf_tensors

    tool = load_tool("convert_checkpoint")
    tool.mcore_to_hf(glm / "mcore", tmp_path / "out", max_shard_size="40KB")
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    files = sorted({f for f in index["weight_map"].values()})
    n = len(files)
    assert n > 3 and files == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    got = {}
    for f in files:
        with safe_open(str(tmp_path / "out" / f), framework="pt") as h:
            size = sum(h.get_tensor(k).nbytes for k in h.keys())
            assert size <= 40_000 or len(list(h.keys())) == 1  # a bigger tensor gets a shard of its own
            got |= {k: h.get_tensor(k) for k in h.keys()}
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in got.values())
    gpt, margs, _ = tool._load_model(glm / "mcore")
    want = hf_tensors(gpt, margs, "glm4_moe")
    assert sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k].to(got[k].dtype)) for k in want)
    platform.destroy()
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb, got["model.embed_tokens.weight"].float()[: emb.shape[0]])


def test_block_fp8_release_dequantises_and_loads(tmp_path, single_process):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.hf.load import load_hf
    from megatron_mtp_rl.hf.reader import HFCheckpoint, dominant_dtype

    bf16 = HFCheckpoint(make_release(tmp_path / "bf16", "glm4_moe", **GLM))
    fp8 = HFCheckpoint(make_release(tmp_path / "fp8", "glm4_moe", fp8=True, **GLM))
    quantised = [n for n in fp8.names() if fp8.is_quantized(n)]
    assert quantised and dominant_dtype(fp8) == "bf16"
    for name in quantised:
        w = fp8.read(name)
        assert w.dtype == torch.bfloat16 and fp8.stored_dtype(name) == torch.float8_e4m3fn
        # by hand: every 128x128 block of the fp8 values times its scale
        raw, scale = fp8._read_raw(name, None, None), fp8._read_raw(name + "_scale_inv", None, None)
        blocks = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[: raw.shape[0], : raw.shape[1]]
        assert torch.equal(w, (raw.float() * blocks).to(torch.bfloat16))
        ref = bf16.read(name).float()
        # fp8 e4m3 keeps 3 mantissa bits: each value within 1/16 of its block's largest, relative
        assert ((w.float() - ref).abs() <= ref.abs().max() / 16 + 1e-3).all(), name
        rows = (5, 37)  # a slice reads only its rows (and their scale blocks) and equals the slice
        assert torch.equal(fp8.read(name, rows=rows), w[5:37])
    tool = load_tool("convert_checkpoint")
    _, margs = tool.hf_to_mcore(tmp_path / "fp8", tmp_path / "mcore")
    assert margs.params_dtype == "bf16"
    gpt, _, _ = tool._load_model(tmp_path / "mcore")
    converted = {k: v.clone() for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    with torch.no_grad():
        for p in gpt.parameters():
            p.zero_()
    load_hf(gpt, tmp_path / "fp8")
    assert all(torch.equal(v, gpt.state_dict()[k]) for k, v in converted.items())
    platform.destroy()


def test_sizes_read_as_hf_spells_them():
    from megatron_mtp_rl.hf.shards import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size("1000") == 1000
    with pytest.raises(ValueError, match="not a size"):
        parse_size("5 gigs")
