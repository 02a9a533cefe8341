"""Qwen3 dense (Qwen/Qwen3-*): GQA with per-head q/k RMSNorm and an explicit ``head_dim``.

* Import: ``Qwen3ForCausalLM`` / ``qwen3``. ``attention_bias`` puts biases on q/k/v AND o_proj
  (megatron's ``add_qkv_bias`` covers q/k/v only): refused when true.
* MTP: Qwen3 releases have none; we use the Qwen3-Next / Qwen3-MoE MTP naming (``mtp.fc``,
  ``mtp.pre_fc_norm_embedding``, ``mtp.pre_fc_norm_hidden``, ``mtp.layers.0.*``, ``mtp.norm``),
  one layer. SGLang 0.5.23 has no draft class for ``Qwen3ForCausalLM`` and its loader fails on
  ``mtp.*`` names, so SGLang exports and weight sync leave the MTP layer out (no MTP drafting for
  this family in rollouts); ``mcore-to-hf --all-mtp-layers`` keeps it.
"""

from __future__ import annotations

from typing import Any

from megatron_mtp_rl.hf.families.base import Family, Reader
from megatron_mtp_rl.hf.mapping import QWEN3
from megatron_mtp_rl.models.presets import ModelArgs


class Qwen3(Family):
    name = "qwen3"
    architecture = "Qwen3ForCausalLM"
    config_class = "Qwen3Config"
    accepts = ("Qwen3ForCausalLM", "qwen3")
    flavour = QWEN3
    draft_class = None
    # SGLang 0.5.23's Qwen3ForCausalLM.load_weights raises on mtp.layers.* (KeyError after the q/k/v
    # rename): exports for SGLang carry no MTP layer; --all-mtp-layers keeps it for our own round trips.
    draft_depth = 0

    def specific(self, r: Reader, fields: dict[str, Any]) -> dict[str, Any]:
        self.partial_rotary(r, mapped=False)
        r.refuse_unless("attention_bias", (None, False), "Qwen3's bias includes o_proj; megatron adds q/k/v bias only")
        return {"qk_layernorm": True}

    def unrepresentable(self, m: ModelArgs) -> list[str]:
        out = self.common_unrepresentable(m)
        if m.is_moe:
            out.append("Qwen3 dense (use qwen3_moe)")
        out += _qwen3_attention(m)
        return out

    def hf_config(self, m: ModelArgs, depth: int) -> dict[str, Any]:
        cfg = self.base_config(m, depth)
        cfg.update(model_type="qwen3", attention_bias=False, use_sliding_window=False, attention_dropout=0.0)
        return cfg


def _qwen3_attention(m: ModelArgs) -> list[str]:
    out = []
    if not m.qk_layernorm:
        out.append("Qwen3 always has q/k RMSNorm (--qk-layernorm)")
    if m.add_qkv_bias:
        out.append("Qwen3's attention_bias would add an o_proj bias too (--add-qkv-bias)")
    if m.rotary_percent != 1.0:
        out.append(f"Qwen3 rotates the whole head (--rotary-percent {m.rotary_percent})")
    if m.multi_latent_attention:
        out.append("MLA is DeepSeek-V3's")
    return out


FAMILY = Qwen3()
