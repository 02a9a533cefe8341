"""DeepSeek-V3 / R1 / Moonlight (``DeepseekV3ForCausalLM``): MLA + the sigmoid MoE GLM-4.5 shares.

* Multi-latent attention: ``q_lora_rank`` (``None``: Moonlight's uncompressed ``q_proj``),
  ``kv_lora_rank``, ``qk_nope_head_dim`` → ``--qk-head-dim``, ``qk_rope_head_dim`` →
  ``--qk-pos-emb-head-dim``, ``v_head_dim``; megatron-core's ``MLATransformerConfig`` on the
  Transformer Engine spec (the local spec cannot build MLA, so CPU runs are refused with one line).
  ``rope_interleave`` must be true (megatron's MLA de-interleaves q_pe/k_pe exactly as HF does).
  ``rope_scaling`` yarn → ``--rope-type yarn`` with its factor, ``original_max_position_embeddings``,
  ``beta_fast``/``beta_slow``/``mscale``/``mscale_all_dim``.
* MoE as GLM-4.5 (see glm4_moe.py): sigmoid + ``e_score_correction_bias``, group-limited top-k,
  ``routed_scaling_factor``, shared experts, dense-first layers.
* MTP at ``model.layers.{L+k}`` with per-layer ``embed_tokens``/``shared_head.head`` copies as the
  published checkpoints store them; SGLang's ``DeepseekV3ForCausalLMNextN`` takes one layer.
"""

from __future__ import annotations

from typing import Any

from megatron_mtp_rl.hf.families.base import Family, Reader
from megatron_mtp_rl.hf.families.glm4_moe import (
    sigmoid_moe_config,
    sigmoid_moe_fields,
    sigmoid_moe_unrepresentable,
    zero_expert_bias,
)
from megatron_mtp_rl.hf.mapping import DEEPSEEK_V3
from megatron_mtp_rl.models.presets import ModelArgs


class DeepseekV3(Family):
    name = "deepseek_v3"
    architecture = "DeepseekV3ForCausalLM"
    config_class = "DeepseekV3Config"
    accepts = ("DeepseekV3ForCausalLM", "deepseek_v3")
    flavour = DEEPSEEK_V3
    draft_class = "DeepseekV3ForCausalLMNextN"

    def maps_rope_type(self, rope_type: str) -> bool:
        return rope_type == "yarn"

    def specific(self, r: Reader, fields: dict[str, Any]) -> dict[str, Any]:
        self.partial_rotary(r, mapped=False)
        r.refuse_unless("attention_bias", (None, False), "MLA here is bias-free")
        if not r.get("rope_interleave", True):
            r.refuse("rope_interleave", False, "megatron's MLA RoPE de-interleaves like rope_interleave=true")
        if r.get("kv_lora_rank") is None:
            r.refuse("kv_lora_rank", None, "DeepSeek-V3 attention is MLA")
        out = sigmoid_moe_fields(r, fields, self.name)
        rope = r.rope()
        out.update(
            multi_latent_attention=True,
            qk_layernorm=True,  # MLA's q_a_layernorm / kv_a_layernorm
            kv_channels=None,
            q_lora_rank=r.get("q_lora_rank"),
            kv_lora_rank=int(r.get("kv_lora_rank", 512)),
            qk_head_dim=int(r.get("qk_nope_head_dim", 128)),
            qk_pos_emb_head_dim=int(r.get("qk_rope_head_dim", 64)),
            v_head_dim=int(r.get("v_head_dim", 128)),
        )
        if rope["rope_type"] == "yarn":
            out.update(
                rope_type="yarn",
                rotary_scaling_factor=float(rope.get("factor", 1.0)),
                original_max_position_embeddings=int(rope.get("original_max_position_embeddings", 4096)),
                beta_fast=float(rope.get("beta_fast", 32)),
                beta_slow=float(rope.get("beta_slow", 1)),
                mscale=float(rope.get("mscale", 1.0)),
                mscale_all_dim=float(rope.get("mscale_all_dim", 0.0)),
            )
        return out

    def unrepresentable(self, m: ModelArgs) -> list[str]:
        out = self.common_unrepresentable(m) + sigmoid_moe_unrepresentable(m, "DeepSeek-V3")
        if not m.multi_latent_attention:
            out.append("DeepSeek-V3 attention is MLA (--multi-latent-attention); GQA MoE exports as glm4_moe")
        return out

    def hf_config(self, m: ModelArgs, depth: int) -> dict[str, Any]:
        cfg = self.base_config(m, depth)
        cfg.pop("head_dim")
        cfg.update(
            model_type="deepseek_v3",
            q_lora_rank=m.q_lora_rank,
            kv_lora_rank=m.kv_lora_rank,
            qk_nope_head_dim=m.qk_head_dim,
            qk_rope_head_dim=m.qk_pos_emb_head_dim,
            v_head_dim=m.v_head_dim,
            rope_interleave=True,
            attention_bias=False,
            **sigmoid_moe_config(m),
        )
        if m.rope_type == "yarn":
            cfg["rope_scaling"] = {
                "type": "yarn",
                "rope_type": "yarn",
                "factor": m.rotary_scaling_factor,
                "original_max_position_embeddings": m.original_max_position_embeddings,
                "beta_fast": m.beta_fast,
                "beta_slow": m.beta_slow,
                "mscale": m.mscale,
                "mscale_all_dim": m.mscale_all_dim,
            }
        return cfg

    def complete(self, hf: dict, m: ModelArgs, depth: int) -> dict:
        return zero_expert_bias(hf, m, depth)


FAMILY = DeepseekV3()
