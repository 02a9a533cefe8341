"""DeepSeek-V3 (MLA): the mapping round trip by names and shapes on CPU, the CPU refusal, and a GPU parity test.

megatron-core builds multi-latent attention only on the Transformer Engine spec, so on CPU the test
checks the mapping itself: a tiny random ``DeepseekV3ForCausalLM`` checkpoint written by transformers
(+ an MTP layer at ``model.layers.{L}`` with DeepSeek's per-layer embedding/head copies) maps onto the
megatron TE-spec names with the shapes megatron's ``MLASelfAttention`` gives them, and back bit-exactly.
The expected megatron names are written here from megatron-core 0.19.2's TE MLA layer spec
(``gpt_layer_specs.get_gpt_layer_with_transformer_engine_submodules``: ``linear_q_down_proj``,
``linear_q_up_proj`` and ``linear_kv_up_proj`` as layer-norm linears when ``qk_layernorm``,
``linear_kv_down_proj``, ``linear_proj``; ``input_layernorm`` kept; dense MLPs fuse their norm).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]

CFG = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=24,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    first_k_dense_replace=1,
    n_group=2,
    topk_group=1,
    routed_scaling_factor=2.5,
    max_position_embeddings=64,
    tie_word_embeddings=False,
    num_nextn_predict_layers=1,
)


def _tool():
    return load_tool("convert_checkpoint")


def make_deepseek(path: Path, **overrides) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    cfg = CFG | overrides
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).save_pretrained(path)
    tensors = load_file(str(path / "model.safetensors"))
    one = DeepseekV3ForCausalLM(DeepseekV3Config(**(cfg | {"num_hidden_layers": 1, "first_k_dense_replace": 0})))
    one.save_pretrained(path / "one")
    L, h = cfg["num_hidden_layers"], cfg["hidden_size"]
    p = f"model.layers.{L}."
    for n, t in load_file(str(path / "one" / "model.safetensors")).items():
        if n.startswith("model.layers.0."):
            tensors[p + n.removeprefix("model.layers.0.")] = t
    g = torch.Generator().manual_seed(1)
    tensors |= {p + "enorm.weight": 1 + 0.1 * torch.randn(h, generator=g), p + "hnorm.weight": torch.ones(h),
                p + "eh_proj.weight": 0.05 * torch.randn(h, 2 * h, generator=g),
                p + "shared_head.norm.weight": torch.ones(h),
                p + "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone(),
                p + "shared_head.head.weight": tensors["lm_head.weight"].clone()}  # fmt: skip
    (path / "model.safetensors").unlink()
    save_file(tensors, str(path / "model.safetensors"))
    return tensors


def test_deepseek_config_maps_to_mla_and_sigmoid_moe():
    from megatron_mtp_rl.hf.families import detect

    raw = DeepseekV3Config(**CFG).to_dict() | {"architectures": ["DeepseekV3ForCausalLM"]}
    m = detect(raw).model_args(raw)
    assert m.multi_latent_attention and m.qk_layernorm
    assert (m.q_lora_rank, m.kv_lora_rank, m.qk_head_dim, m.qk_pos_emb_head_dim, m.v_head_dim) == (32, 24, 16, 8, 16)
    assert m.moe_layer_pattern() == [0, 1] and m.moe_shared_expert_intermediate_size == 32
    assert (m.moe_router_num_groups, m.moe_router_group_topk, m.moe_router_topk_scaling_factor) == (2, 1, 2.5)
    yarn = raw | {"rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}  # fmt: skip
    y = detect(yarn).model_args(yarn)
    assert (y.rope_type, y.rotary_scaling_factor, y.original_max_position_embeddings, y.mscale_all_dim) == (
        "yarn", 40.0, 16, 1.0)  # fmt: skip


@pytest.mark.parametrize("q_lora_rank", [32, None], ids=["v3", "moonlight-no-q-lora"])
def test_mla_mapping_round_trip_by_names_and_shapes(tmp_path, q_lora_rank):
    from megatron_mtp_rl.hf.families import detect
    from megatron_mtp_rl.hf.mapping import hf_to_megatron, megatron_to_hf

    src = make_deepseek(tmp_path / "hf", q_lora_rank=q_lora_rank)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    fam = detect(cfg)
    m = fam.model_args(cfg)
    meg = hf_to_megatron(src, m, fam.flavour, fused_layernorm=True)
    heads, h, v = 4, 64, 64
    qk, rope, vd, kvr = 16, 8, 16, 24
    attn = {
        "input_layernorm.weight": (h,),
        "self_attention.linear_kv_down_proj.weight": (kvr + rope, h),
        "self_attention.linear_kv_up_proj.layer_norm_weight": (kvr,),
        "self_attention.linear_kv_up_proj.weight": (heads * (qk + vd), kvr),
        "self_attention.linear_proj.weight": (h, heads * vd),
    }
    if q_lora_rank:
        attn |= {
            "self_attention.linear_q_down_proj.weight": (32, h),
            "self_attention.linear_q_up_proj.layer_norm_weight": (32,),
            "self_attention.linear_q_up_proj.weight": (heads * (qk + rope), 32),
        }
    else:
        attn["self_attention.linear_q_proj.weight"] = (heads * (qk + rope), h)
    dense = {
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc1.weight": (192, h),
        "mlp.linear_fc2.weight": (h, 96),
    }
    moe = {"pre_mlp_layernorm.weight": (h,), "mlp.router.weight": (4, h), "mlp.router.expert_bias": (4,)}
    moe |= {"mlp.shared_experts.linear_fc1.weight": (64, h), "mlp.shared_experts.linear_fc2.weight": (h, 32)}
    moe |= {f"mlp.experts.local_experts.{e}.linear_fc1.weight": (64, h) for e in range(4)}
    moe |= {f"mlp.experts.local_experts.{e}.linear_fc2.weight": (h, 32) for e in range(4)}
    expected = {"embedding.word_embeddings.weight": (v, h), "output_layer.weight": (v, h),
                "decoder.final_layernorm.weight": (h,), "mtp.layers.0.enorm.weight": (h,),
                "mtp.layers.0.hnorm.weight": (h,), "mtp.layers.0.eh_proj.weight": (h, 2 * h),
                "mtp.layers.0.final_layernorm.weight": (h,)}  # fmt: skip
    expected |= {f"decoder.layers.0.{n}": s for n, s in (attn | dense).items()}
    expected |= {f"decoder.layers.1.{n}": s for n, s in (attn | moe).items()}
    expected |= {f"mtp.layers.0.mtp_model_layer.{n}": s for n, s in (attn | moe).items()}  # MoE, like the last layer
    assert {n: tuple(t.shape) for n, t in meg.items()} == expected
    back = megatron_to_hf(meg, m, fam.flavour)  # DeepSeek naming writes the per-MTP-layer copies back
    assert sorted(back) == sorted(src)
    assert all(torch.equal(back[n], t) for n, t in src.items())


def test_mla_conversion_is_refused_on_cpu_with_one_line(single_process, tmp_path):
    conv = _tool()
    make_deepseek(tmp_path / "hf")
    with pytest.raises(conv.ConversionError) as e:
        conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", use_te=False)
    assert "Transformer Engine" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.gpu
def test_mla_parity_with_transformers_on_gpu(tmp_path):
    """Where CUDA and Transformer Engine exist: HF → Megatron (TE MLA) → verify ≤ 1e-4, main and MTP heads."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA (tests/conftest.py hides it on CPU machines)")
    pytest.importorskip("transformer_engine")
    conv = _tool()
    make_deepseek(tmp_path / "hf")
    conv.hf_to_mcore(tmp_path / "hf", tmp_path / "mcore", use_te=True)
    main, mtp = conv.verify(tmp_path / "hf", tmp_path / "mcore", seq_len=24)
    assert main <= 1e-4 and all(d <= 1e-4 for d in mtp), (main, mtp)
