"""The recipes' model sections are what the converter makes of each release's published config.json.

The configs below are the released ``config.json`` values (MiMo-7B-RL, GLM-4.5-Air, Qwen3-30B-A3B,
Moonlight-16B-A3B, DeepSeek-V3 in its bf16 form), trimmed to the keys that shape or change the model.
A recipe launched with ``--load`` of the converted checkpoint must not disagree with it, so every shape
field of the recipe equals the family's reading of the published config.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

RECIPES = Path(__file__).resolve().parents[2] / "examples" / "recipes"

PUBLISHED = {
    "mimo_7b_dapo_occ": {
        "architectures": ["MiMoForCausalLM"], "model_type": "mimo", "hidden_size": 4096,
        "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 640000, "vocab_size": 151680,
        "tie_word_embeddings": False, "num_nextn_predict_layers": 1, "hidden_act": "silu",
        "use_sliding_window": False, "max_window_layers": 36, "attention_dropout": 0.0,
    },
    "glm45_air_occ": {
        "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "attention_bias": True,
        "first_k_dense_replace": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
        "intermediate_size": 10944, "max_position_embeddings": 131072, "moe_intermediate_size": 1408, "n_group": 1,
        "n_routed_experts": 128, "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 96,
        "num_experts_per_tok": 8, "num_hidden_layers": 46, "num_key_value_heads": 8, "num_nextn_predict_layers": 1,
        "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
        "routed_scaling_factor": 1.0, "tie_word_embeddings": False, "topk_group": 1, "use_qk_norm": False,
        "vocab_size": 151552,
    },
    "qwen3_30b_a3b_occ": {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "attention_bias": False,
        "decoder_sparse_step": 1, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "intermediate_size": 6144, "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
        "use_sliding_window": False, "vocab_size": 151936,
    },
    "moonlight_16b_a3b_occ": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 2048,
        "intermediate_size": 11264, "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64, "routed_scaling_factor": 2.446,
        "kv_lora_rank": 512, "q_lora_rank": None, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
        "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6, "moe_layer_freq": 1,
        "first_k_dense_replace": 1, "norm_topk_prob": True, "scoring_func": "sigmoid", "hidden_act": "silu",
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 50000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "vocab_size": 163840,
    },
    "deepseek_v3_671b_layout": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "first_k_dense_replace": 3,
        "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
        "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "q_lora_rank": 1536,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4,
        "topk_method": "noaux_tc", "v_head_dim": 128, "vocab_size": 129280,
    },
}  # fmt: skip

NOT_SHAPE = {"seq_length", "moe_aux_loss_coeff", "moe_token_dispatcher_type", "init_method_std"}


@pytest.mark.parametrize("recipe", sorted(PUBLISHED))
def test_recipe_model_equals_the_converted_release(recipe):
    from megatron_mtp_rl.config import parse_config, resolve_model_args
    from megatron_mtp_rl.hf.families import detect

    published = PUBLISHED[recipe]
    vocab = published["vocab_size"]
    cfg = parse_config(["--config", str(RECIPES / f"{recipe}.yaml")])
    ours = resolve_model_args(cfg, vocab)
    fam = detect(published)
    converted = fam.model_args(published, make_vocab_size_divisible_by=128, params_dtype="bf16", mtp_num_layers=1)
    diff = {
        f.name: (getattr(ours, f.name), getattr(converted, f.name))
        for f in fields(ours)
        if f.name not in NOT_SHAPE and getattr(ours, f.name) != getattr(converted, f.name)
    }
    assert not diff, f"{recipe}: recipe vs converted release (field: (recipe, converted)): {diff}"
    assert cfg.rollout.hf_flavour == fam.name


def test_block_fp8_release_is_read_and_other_quantisations_refused():
    from megatron_mtp_rl.hf.families import UnsupportedCheckpoint, detect

    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    fp8 = PUBLISHED["deepseek_v3_671b_layout"] | {"quantization_config": q}
    assert detect(fp8).model_args(fp8).num_experts == 256  # dequantised to bf16 on load (models/weight_stream)
    awq = PUBLISHED["deepseek_v3_671b_layout"] | {"quantization_config": {"quant_method": "awq"}}
    with pytest.raises(UnsupportedCheckpoint, match="quant_method='awq'"):
        detect(awq).model_args(awq)
