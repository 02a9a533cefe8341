"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (zai-org): ``Glm4MoeForCausalLM``.

Everything maps onto megatron-core options:

* q/k/v bias (``attention_bias``; o_proj has none) → ``--add-qkv-bias``; ``use_qk_norm`` →
  ``--qk-layernorm``; ``head_dim`` → ``--kv-channels``; ``partial_rotary_factor`` (0.5) →
  ``--rotary-percent`` (both rotate the first half of each head, rotate-half form);
* ``first_k_dense_replace`` → ``--moe-layer-freq [0]*k+[1]*(L-k)`` (megatron's block spec);
* ``n_shared_experts`` × ``moe_intermediate_size`` → ``--moe-shared-expert-intermediate-size``;
* sigmoid routing with ``e_score_correction_bias`` → ``--moe-router-score-function sigmoid
  --moe-router-enable-expert-bias``; ``routed_scaling_factor`` → ``--moe-router-topk-scaling-factor``;
  ``n_group``/``topk_group`` → ``--moe-router-num-groups``/``--moe-router-group-topk`` (megatron sums the
  top-(topk/topk_group) scores per group; HF sums the top 2, so other ratios are refused).
  Megatron normalises sigmoid top-k weights: ``norm_topk_prob=false`` is refused.
* MTP layer ``k`` at ``model.layers.{L+k}``: ``enorm``/``hnorm``/``eh_proj``/``shared_head.norm`` + a
  decoder layer (MoE, like the last trunk layer); SGLang's ``Glm4MoeForCausalLMNextN`` asserts ONE
  layer, so exports carry depth 1. Per-layer ``embed_tokens``/``shared_head.head`` copies are
  accepted on import (checked equal) and not written.
"""

from __future__ import annotations

from typing import Any

from megatron_mtp_rl.hf.families.base import Family, Reader
from megatron_mtp_rl.hf.mapping import GLM4_MOE
from megatron_mtp_rl.models.presets import ModelArgs


def sigmoid_moe_fields(r: Reader, fields: dict[str, Any], family: str) -> dict[str, Any]:
    """The DeepSeek-V3-style MoE block GLM-4.5 and DeepSeek-V3 share."""
    experts = r.get("n_routed_experts")
    if not experts:
        r.refuse("n_routed_experts", experts, f"a {family} config needs routed experts")
    topk = int(r.get("num_experts_per_tok", 8))
    r.refuse_unless("scoring_func", (None, "sigmoid"), "this family routes with sigmoid")
    r.refuse_unless("topk_method", (None, "noaux_tc"), "only noaux_tc (bias-corrected group top-k) is mapped")
    if not r.get("norm_topk_prob", True) and topk > 1:
        r.refuse("norm_topk_prob", False, "megatron normalises sigmoid top-k weights")
    groups, group_topk = int(r.get("n_group", 1)), int(r.get("topk_group", 1))
    if groups > 1 and topk // group_topk != 2:
        r.refuse(
            "topk_group", group_topk, f"HF ranks groups by their top-2 scores, megatron by top-{topk // group_topk}"
        )
    dense_first = int(r.get("first_k_dense_replace", 0))
    layers = fields["num_layers"]
    if r.get("moe_layer_freq", 1) != 1:
        r.refuse("moe_layer_freq", r.get("moe_layer_freq"), "only dense-first layouts are mapped")
    shared = int(r.get("n_shared_experts", 0) or 0)
    moe_ffn = r.get("moe_intermediate_size")
    scale = float(r.get("routed_scaling_factor", 1.0))
    return {
        "num_experts": int(experts or 0) or None,
        "moe_router_topk": topk,
        "moe_ffn_hidden_size": moe_ffn,
        "moe_layer_freq": 1 if dense_first == 0 else f"([0]*{dense_first}+[1]*{layers - dense_first})",
        "moe_shared_expert_intermediate_size": shared * moe_ffn if shared and moe_ffn else None,
        "moe_router_score_function": "sigmoid",
        "moe_router_enable_expert_bias": True,
        "moe_router_num_groups": groups if groups > 1 else None,
        "moe_router_group_topk": group_topk if groups > 1 else None,
        "moe_router_topk_scaling_factor": None if scale == 1.0 else scale,
        "moe_aux_loss_coeff": 0.0,
    }


def sigmoid_moe_unrepresentable(m: ModelArgs, family: str) -> list[str]:
    out = []
    if not m.is_moe:
        out.append(f"{family} is a MoE family (--num-experts)")
        return out
    if m.moe_router_score_function != "sigmoid":
        out.append(f"{family} routes with sigmoid (--moe-router-score-function {m.moe_router_score_function})")
    if m.moe_router_pre_softmax:
        out.append(f"{family} has no --moe-router-pre-softmax")
    pattern = m.moe_layer_pattern()
    k = pattern.index(1) if 1 in pattern else len(pattern)
    if pattern != [0] * k + [1] * (len(pattern) - k):
        out.append(
            f"{family} has dense layers first only (first_k_dense_replace), not --moe-layer-freq {m.moe_layer_freq}"
        )
    shared, ffn = m.moe_shared_expert_intermediate_size, m.moe_ffn_hidden_size or m.ffn_hidden_size
    if shared and shared % ffn:
        out.append(f"shared expert width {shared} is not a multiple of the expert width {ffn} (n_shared_experts)")
    if m.moe_router_num_groups and m.moe_router_topk // (m.moe_router_group_topk or 1) != 2:
        out.append(
            "HF ranks expert groups by their top-2 scores (--moe-router-topk / --moe-router-group-topk must be 2)"
        )
    return out


def sigmoid_moe_config(m: ModelArgs) -> dict[str, Any]:
    pattern = m.moe_layer_pattern()
    ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size
    shared = m.moe_shared_expert_intermediate_size
    return {
        "n_routed_experts": m.num_experts,
        "num_experts_per_tok": m.moe_router_topk,
        "moe_intermediate_size": ffn,
        "first_k_dense_replace": pattern.index(1) if 1 in pattern else m.num_layers,
        "n_shared_experts": shared // ffn if shared else 0,  # transformers 5 wants an int; 0 = none
        "routed_scaling_factor": m.moe_router_topk_scaling_factor or 1.0,
        "n_group": m.moe_router_num_groups or 1,
        "topk_group": m.moe_router_group_topk or 1,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
    }


def zero_expert_bias(hf: dict, m: ModelArgs, depth: int) -> dict:
    """SGLang's sigmoid routers always load ``e_score_correction_bias``; zeros = no bias, exactly."""
    import torch

    out = dict(hf)
    for name in list(hf):
        if name.endswith(".mlp.gate.weight"):
            bias = name.removesuffix("weight") + "e_score_correction_bias"
            if bias not in hf:
                out[bias] = torch.zeros(hf[name].shape[0], dtype=torch.float32)
    return out


class Glm4Moe(Family):
    name = "glm4_moe"
    architecture = "Glm4MoeForCausalLM"
    config_class = "Glm4MoeConfig"
    accepts = ("Glm4MoeForCausalLM", "glm4_moe")
    flavour = GLM4_MOE
    draft_class = "Glm4MoeForCausalLMNextN"
    served_class_ties = False  # SGLang's Glm4MoeForCausalLM ignores tie_word_embeddings

    def specific(self, r: Reader, fields: dict[str, Any]) -> dict[str, Any]:
        factor = self.partial_rotary(r, mapped=True)
        out = sigmoid_moe_fields(r, fields, self.name)
        out.update(
            add_qkv_bias=bool(r.get("attention_bias", False)),
            qk_layernorm=bool(r.get("use_qk_norm", False)),
            rotary_percent=factor,
        )
        return out

    def unrepresentable(self, m: ModelArgs) -> list[str]:
        out = self.common_unrepresentable(m) + sigmoid_moe_unrepresentable(m, "GLM-4.5")
        if m.multi_latent_attention:
            out.append("MLA is DeepSeek-V3's")
        return out

    def hf_config(self, m: ModelArgs, depth: int) -> dict[str, Any]:
        cfg = self.base_config(m, depth)
        cfg.update(
            model_type="glm4_moe",
            attention_bias=m.add_qkv_bias,
            use_qk_norm=m.qk_layernorm,
            partial_rotary_factor=m.rotary_percent,
            attention_dropout=0.0,
            **sigmoid_moe_config(m),
        )
        return cfg

    def complete(self, hf: dict, m: ModelArgs, depth: int) -> dict:
        return zero_expert_bias(hf, m, depth)


FAMILY = Glm4Moe()
