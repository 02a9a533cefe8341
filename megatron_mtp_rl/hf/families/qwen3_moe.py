"""Qwen3-MoE (Qwen/Qwen3-30B-A3B, 235B-A22B): Qwen3 attention + softmax top-k routed experts.

* Import: ``Qwen3MoeForCausalLM`` / ``qwen3_moe``. Routing is softmax; ``norm_topk_prob=true`` is
  megatron's default (softmax over the top-k logits), ``false`` is ``--moe-router-pre-softmax``.
  ``decoder_sparse_step`` / ``mlp_only_layers`` become ``--moe-layer-freq``. No shared expert.
* MTP: ``mtp.fc`` / ``mtp.pre_fc_norm_{embedding,hidden}`` / ``mtp.layers.0.*`` / ``mtp.norm``
  (SGLang 0.5.23 ``Qwen3MoeForCausalLMMTP``: ``fc(cat(norm(emb), norm(hidden)))`` as megatron's
  ``eh_proj``); one layer.
"""

from __future__ import annotations

from typing import Any

from megatron_mtp_rl.hf.families.base import Family, Reader
from megatron_mtp_rl.hf.families.qwen3 import _qwen3_attention
from megatron_mtp_rl.hf.mapping import QWEN3_MOE
from megatron_mtp_rl.models.presets import ModelArgs


class Qwen3Moe(Family):
    name = "qwen3_moe"
    architecture = "Qwen3MoeForCausalLM"
    config_class = "Qwen3MoeConfig"
    accepts = ("Qwen3MoeForCausalLM", "qwen3_moe")
    flavour = QWEN3_MOE
    draft_class = "Qwen3MoeForCausalLMMTP"
    served_class_ties = False  # SGLang's Qwen3MoeForCausalLM ignores tie_word_embeddings

    def specific(self, r: Reader, fields: dict[str, Any]) -> dict[str, Any]:
        self.partial_rotary(r, mapped=False)
        r.refuse_unless("attention_bias", (None, False), "Qwen3's bias includes o_proj; megatron adds q/k/v bias only")
        experts = r.get("num_experts", r.get("num_local_experts"))
        if not experts:
            r.refuse("num_experts", experts, "a Qwen3-MoE config needs experts")
        topk = int(r.get("num_experts_per_tok", 8))
        norm = r.get("norm_topk_prob", False)
        layers = fields["num_layers"]
        step = int(r.get("decoder_sparse_step", 1))
        dense = set(r.get("mlp_only_layers") or [])
        pattern = [0 if (i in dense or (i + 1) % step) else 1 for i in range(layers)]
        for key in ("shared_expert_intermediate_size", "n_shared_experts"):
            r.refuse_unless(key, (None, 0), "Qwen3-MoE has no shared expert")
        r.refuse_unless("scoring_func", (None, "softmax"))
        r.refuse_unless("routed_scaling_factor", (None, 1.0))
        if topk == 1 and norm:
            r.refuse("norm_topk_prob", norm, "top-1 with normalised weights (= 1) has no megatron router")
        return {
            "qk_layernorm": True,
            "num_experts": int(experts or 0) or None,
            "moe_router_topk": topk,
            "moe_ffn_hidden_size": r.get("moe_intermediate_size"),
            "moe_router_pre_softmax": not norm,
            "moe_layer_freq": 1 if all(pattern) else "[" + ",".join(map(str, pattern)) + "]",
            "moe_aux_loss_coeff": 0.0,
        }

    def unrepresentable(self, m: ModelArgs) -> list[str]:
        out = self.common_unrepresentable(m) + _qwen3_attention(m)
        if not m.is_moe:
            out.append("Qwen3-MoE needs experts (use qwen3)")
            return out
        if m.moe_router_score_function != "softmax":
            out.append(f"Qwen3-MoE routes with softmax (--moe-router-score-function {m.moe_router_score_function})")
        for flag_name, value in (
            ("--moe-shared-expert-intermediate-size", m.moe_shared_expert_intermediate_size),
            ("--moe-router-enable-expert-bias", m.moe_router_enable_expert_bias),
            ("--moe-router-num-groups", m.moe_router_num_groups),
            ("--moe-router-topk-scaling-factor", m.moe_router_topk_scaling_factor),
        ):
            if value:
                out.append(f"Qwen3-MoE has no {flag_name}")
        return out

    def hf_config(self, m: ModelArgs, depth: int) -> dict[str, Any]:
        cfg = self.base_config(m, depth)
        pattern = m.moe_layer_pattern()
        cfg.update(
            model_type="qwen3_moe",
            attention_bias=False,
            use_sliding_window=False,
            attention_dropout=0.0,
            num_experts=m.num_experts,
            num_experts_per_tok=m.moe_router_topk,
            moe_intermediate_size=m.moe_ffn_hidden_size or m.ffn_hidden_size,
            norm_topk_prob=not m.moe_router_pre_softmax,
            decoder_sparse_step=1,
            mlp_only_layers=[i for i, x in enumerate(pattern) if not x],
            router_aux_loss_coef=m.moe_aux_loss_coeff,
        )
        return cfg


FAMILY = Qwen3Moe()
