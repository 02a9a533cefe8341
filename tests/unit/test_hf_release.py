"""tests/hf_release.py builds releases the way the hub lays them out, and transformers loads them."""

from __future__ import annotations

import json

import pytest
import torch

# Import the HF model code before our CPU shims (see test_convert_checkpoint.py).
import transformers

from tests.hf_release import is_fp8_weight, make_release

SHAPE = dict(hidden=64, layers=2, mtp_layers=1, shards=3)
LOADERS = {"glm4_moe": transformers.Glm4MoeForCausalLM, "qwen3_moe": transformers.Qwen3MoeForCausalLM,
           "mimo": transformers.Qwen2ForCausalLM}  # fmt: skip
MTP_PREFIX = {"glm4_moe": "model.layers.2.", "qwen3_moe": "mtp.", "mimo": "model.mtp_layers.0."}


def _read(d):
    from safetensors.torch import load_file

    index = json.loads((d / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in sorted(set(index["weight_map"].values())):
        part = load_file(str(d / f))
        assert {index["weight_map"][n] for n in part} == {f}  # the index says where each tensor is
        tensors |= part
    assert sorted(tensors) == sorted(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    return index, tensors


@pytest.mark.parametrize("family", sorted(LOADERS))
def test_release_is_sharded_bf16_with_mtp_and_transformers_loads_it(tmp_path, family):
    d = make_release(tmp_path / family, family, experts=0 if family == "mimo" else 4, seed=1, **SHAPE)
    index, tensors = _read(d)
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert {t.dtype for n, t in tensors.items() if not n.endswith("e_score_correction_bias")} == {torch.bfloat16}
    biases = [t for n, t in tensors.items() if n.endswith("e_score_correction_bias")]
    assert (len(biases) == 2) == (family == "glm4_moe") and all(b.dtype == torch.float32 for b in biases)
    mtp = [n for n in tensors if n.startswith(MTP_PREFIX[family])]
    assert any(".self_attn.q_proj.weight" in n for n in mtp) and len(mtp) > 8, mtp
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["num_nextn_predict_layers"] == 1
    assert "quantization_config" not in cfg
    model, info = LOADERS[family].from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    assert all(k.startswith(MTP_PREFIX[family]) for k in info["unexpected_keys"]), info["unexpected_keys"]
    got = dict(model.named_parameters())["model.layers.1.self_attn.o_proj.weight"]
    assert torch.equal(got.to(torch.bfloat16), tensors["model.layers.1.self_attn.o_proj.weight"])
    if family == "mimo":
        assert cfg["architectures"] == ["MiMoForCausalLM"] and cfg["model_type"] == "mimo"


def test_fp8_release_dequantises_to_the_bf16_one_within_fp8_rounding(tmp_path):
    from megatron_mtp_rl.hf.fp8 import block_size_from_config, dequantize_fp8_blocks

    ref = _read(make_release(tmp_path / "bf16", "glm4_moe", experts=4, seed=3, **SHAPE))[1]
    d = make_release(tmp_path / "fp8", "glm4_moe", experts=4, seed=3, fp8=True, **SHAPE)
    index, tensors = _read(d)
    block = block_size_from_config(json.loads((d / "config.json").read_text()))
    assert block == (128, 128)
    quantised = [n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert sorted(quantised) == sorted(n for n, t in ref.items() if is_fp8_weight(n, t))
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in quantised
    assert "model.layers.2.eh_proj.weight" not in quantised and "lm_head.weight" not in quantised
    assert sorted(n for n in tensors if not n.endswith("_scale_inv")) == sorted(ref)
    for name in quantised:
        deq = dequantize_fp8_blocks(tensors[name], tensors[name + "_scale_inv"], block)
        want = ref[name].float()
        assert ((deq.float() - want).abs() <= want.abs() * 2**-3 + 1e-4).all(), name
    for name in set(ref) - set(quantised):
        assert torch.equal(tensors[name], ref[name]), name
