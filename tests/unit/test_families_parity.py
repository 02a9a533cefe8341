"""Real HF families, end to end on tiny RANDOM models built here with transformers (no downloads).

For MiMo (Qwen2 trunk + ``model.mtp_layers.k``), Qwen3, Qwen3-MoE and GLM-4.5:
HF → Megatron (tools/convert_checkpoint.py hf-to-mcore) → ``verify``: main-head log-probs equal
transformers' within 1e-4 (fp32), and so do the MTP heads against a reference forward written from the
HF weights; Megatron → HF with every MTP layer is bit-exact. The MTP layers' decoder weights come from a
one-layer model of the same transformers class (so they carry that class's checkpoint names); the
MTP-only tensors are named here from the published layouts (MiMo's ``token_layernorm``/
``hidden_layernorm``/``input_proj``/``final_layernorm``; GLM/DeepSeek ``enorm``/``hnorm``/``eh_proj``/
``shared_head.norm``; Qwen3-MoE ``mtp.fc``/``mtp.pre_fc_norm_*``/``mtp.norm``).

Also here, independent of the tool's own reference: the MiMo and GLM-4.5 MTP heads recomputed the way
SGLang 0.5.23's ``MiMoMTP`` / ``Glm4MoeModelNextN`` compute them, with transformers' decoder layers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.hf_release import mtp_only_tensors, randomise
from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]

# Import the HF model code before our CPU shims (see test_convert_checkpoint.py).
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    Glm4MoeConfig,
    Glm4MoeForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)


def tool():
    return load_tool("convert_checkpoint")


TINY = dict(
    vocab_size=64,  # = megatron's padded size (see test_convert_checkpoint.REF_VOCAB_NOTE)
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)

# family → (CausalLM class, config class, config kwargs, MTP layers written)
FAMILIES = {
    "mimo": (Qwen2ForCausalLM, Qwen2Config, dict(rope_parameters={"rope_type": "default", "rope_theta": 640000.0},
                                                   tie_word_embeddings=False), 2),
    "qwen3": (Qwen3ForCausalLM, Qwen3Config, dict(head_dim=32, tie_word_embeddings=True), 1),
    "qwen3_moe": (Qwen3MoeForCausalLM, Qwen3MoeConfig, dict(head_dim=32, num_experts=4, num_experts_per_tok=2,
                                                            moe_intermediate_size=32, norm_topk_prob=True,
                                                            tie_word_embeddings=False), 1),
    "glm4_moe": (Glm4MoeForCausalLM, Glm4MoeConfig, dict(
        num_hidden_layers=3, head_dim=32, attention_bias=True, partial_rotary_factor=0.5, n_routed_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, n_group=2, topk_group=1, norm_topk_prob=True, use_qk_norm=True,
        tie_word_embeddings=False), 1),
}  # fmt: skip


def make_family_checkpoint(path: Path, family: str, seed: int = 0):
    """A tiny random HF checkpoint of ``family`` with MTP layers; returns (reference model, all tensors)."""
    from safetensors.torch import load_file, save_file

    model_cls, cfg_cls, extra, depth = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = cfg_cls(**(TINY | extra))
    ref = model_cls(cfg).eval()
    randomise(ref, seed + 1)
    ref.save_pretrained(path)  # transformers writes the checkpoint names and config.json
    tensors = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed + 2)
    layers = cfg.num_hidden_layers
    one_kwargs = TINY | extra | {"num_hidden_layers": 1, "first_k_dense_replace": 0}
    for k in range(depth):
        one = model_cls(cfg_cls(**one_kwargs))
        randomise(one, seed + 10 + k)
        one.save_pretrained(path / f"one{k}")
        layer = {n: t for n, t in load_file(str(path / f"one{k}" / "model.safetensors")).items()
                 if n.startswith("model.layers.0.")}  # fmt: skip
        prefix, own = mtp_only_tensors(family, layers, k, cfg.hidden_size, g)
        tensors |= own | {prefix + n.removeprefix("model.layers.0."): t for n, t in layer.items()}
    config = json.loads((path / "config.json").read_text()) | {"num_nextn_predict_layers": depth}
    if family == "mimo":  # MiMo's release: Qwen2 + MTP under its own model type
        config |= {"architectures": ["MiMoForCausalLM"], "model_type": "mimo"}
    for f in path.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return ref, tensors


@pytest.fixture(scope="module")
def converted(tmp_path_factory, single_process):
    """family → (HF dir, our checkpoint dir, reference model, HF tensors, ModelArgs), built once per module."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(family)
        ref, tensors = make_family_checkpoint(root / "hf", family)
        _, margs = tool().hf_to_mcore(root / "hf", root / "mcore")
        out[family] = (root / "hf", root / "mcore", ref, tensors, margs)
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_verify_main_and_mtp_heads_match_transformers(converted, family):
    hf_dir, mcore, ref, _, margs = converted[family]
    main, mtp = tool().verify(hf_dir, mcore, seq_len=24, batch=2)
    assert main <= 1e-4, main
    assert len(mtp) == FAMILIES[family][3]
    assert all(d <= 1e-4 for d in mtp), mtp
    # the reference itself is transformers' model: its main head equals the tool's trunk reference
    tokens = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ref(input_ids=tokens).logits
    want = torch.log_softmax(logits, -1)[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
    got, _ = tool().hf_reference_logprobs(hf_dir, tokens, 0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


EXPECTED_ARGS = {
    "mimo": dict(add_qkv_bias=True, rotary_base=640000, mtp_num_layers=2, norm_epsilon=1e-6, qk_layernorm=False),
    "qwen3": dict(qk_layernorm=True, kv_channels=32, add_qkv_bias=False, untie_embeddings_and_output_weights=False),
    "qwen3_moe": dict(qk_layernorm=True, kv_channels=32, num_experts=4, moe_router_pre_softmax=False),
    "glm4_moe": dict(
        add_qkv_bias=True, qk_layernorm=True, kv_channels=32, rotary_percent=0.5, moe_layer_freq="([0]*1+[1]*2)",
        moe_shared_expert_intermediate_size=32, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=2, moe_router_group_topk=1,
        moe_router_topk_scaling_factor=2.5,
    ),
}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_config_maps_to_megatron_options(converted, family):
    margs = converted[family][4]
    for key, value in EXPECTED_ARGS[family].items():
        assert getattr(margs, key) == value, key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_megatron_to_hf_round_trip_is_bit_exact(converted, tmp_path, family):
    from safetensors.torch import load_file

    hf_dir, mcore, _, src, _ = converted[family]
    out = tool().mcore_to_hf(mcore, tmp_path / "back", all_mtp_layers=True)
    back = load_file(str(out / "model.safetensors"))
    assert sorted(back) == sorted(src)
    for name, t in src.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name


# ---------------------------------------------------------------------------------------------
# MTP heads as SGLang's drafts compute them, written here from the HF weights


def _rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@torch.no_grad()
def _draft_logprobs(family, ref, tensors, tokens, *, zero_first_embedding=False):
    """Depth-1 draft log-probs of tokens[:, 2:] at positions 0..T-3 (SGLang: ``MiMoMTP`` / ``Glm4MoeModelNextN``).

    MiMo: ``input_proj(cat(hidden_layernorm(h), token_layernorm(emb)))`` → Qwen2 decoder layer →
    ``final_layernorm`` → lm_head; ``zero_first_embedding`` is MiMoMTP's ``hidden_states[positions == 0] = 0``.
    GLM-4.5: ``eh_proj(cat(enorm(emb), hnorm(h)))`` → Glm4Moe decoder layer (MoE) → ``shared_head.norm`` → lm_head.
    ``h`` is the target model's final (normed) hidden state at position i, ``emb`` the embedding of token i+1.
    """
    cfg = ref.config
    eps = cfg.rms_norm_eps
    h = ref.model(input_ids=tokens).last_hidden_state
    emb = ref.model.embed_tokens(torch.roll(tokens, -1, dims=1))
    if zero_first_embedding:
        emb[:, 0] = 0
    if family == "mimo":
        p = "model.mtp_layers.0."
        x = torch.cat((_rms(h, tensors[p + "hidden_layernorm.weight"], eps),
                       _rms(emb, tensors[p + "token_layernorm.weight"], eps)), -1)  # fmt: skip
        x = x @ tensors[p + "input_proj.weight"].t()
        layer = transformers.models.qwen2.modeling_qwen2.Qwen2DecoderLayer(cfg, layer_idx=0)
        final = tensors[p + "final_layernorm.weight"]
    else:
        p = f"model.layers.{cfg.num_hidden_layers}."
        x = torch.cat((_rms(emb, tensors[p + "enorm.weight"], eps), _rms(h, tensors[p + "hnorm.weight"], eps)), -1)
        x = x @ tensors[p + "eh_proj.weight"].t()
        layer = transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeDecoderLayer(cfg, layer_idx=cfg.num_hidden_layers)
        final = tensors[p + "shared_head.norm.weight"]
    state = {n[len(p) :]: t for n, t in tensors.items() if n.startswith(p)}
    own = layer.state_dict()
    for name in own:  # transformers 5 fuses experts: [E, 2I, H] gate_up, [E, H, I] down
        if name.endswith("experts.gate_up_proj"):
            gate = [state[f"mlp.experts.{i}.gate_proj.weight"] for i in range(own[name].shape[0])]
            up = [state[f"mlp.experts.{i}.up_proj.weight"] for i in range(own[name].shape[0])]
            state[name] = torch.stack([torch.cat(pair) for pair in zip(gate, up)])
        elif name.endswith("experts.down_proj"):
            state[name] = torch.stack([state[f"mlp.experts.{i}.down_proj.weight"] for i in range(own[name].shape[0])])
    layer.load_state_dict({n: state[n] for n in own})
    layer.eval()
    positions = torch.arange(tokens.shape[1])[None]
    rope = ref.model.rotary_emb(x, positions)
    mask = torch.full((tokens.shape[1],) * 2, float("-inf")).triu(1)[None, None]
    y = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope)
    y = y[0] if isinstance(y, tuple) else y
    logits = _rms(y, final, eps) @ ref.lm_head.weight.t()
    n = tokens.shape[1] - 2
    return torch.log_softmax(logits, -1)[:, :n].gather(-1, tokens[:, 2:, None])[..., 0]


@pytest.mark.parametrize("family", ["mimo", "glm4_moe"])
def test_mtp_head_equals_sglang_draft_reference(converted, family):
    """Our depth-1 MTP log-probs = the draft's, recomputed here from the HF weights (fp32, ≤ 1e-4).

    MiMo's draft zeroes the token embedding at position 0, and so does our MiMo MTP forward
    (``mtp_zero_first_embedding``; packed batches: tests/unit/test_mimo_draft_parity.py).
    """
    _, mcore, ref, tensors, _ = converted[family]
    tokens = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(7))
    gpt, _, _ = tool()._load_model(mcore)
    _, ours = tool().our_logprobs(gpt, tokens)
    want = _draft_logprobs(family, ref, tensors, tokens, zero_first_embedding=family == "mimo")
    assert (ours[0] - want).abs().max().item() <= 1e-4
