"""MiMo-7B (XiaomiMiMo/MiMo-7B-RL): a Qwen2 trunk (q/k/v bias, rope base 640000) + ``model.mtp_layers.{k}``.

* Import: ``MiMoForCausalLM`` / ``mimo`` and plain ``Qwen2ForCausalLM`` / ``qwen2`` (no MTP).
  Qwen2 always has q/k/v biases (``add_qkv_bias``) and no o_proj bias; no qk-norm; full rotary.
* MTP layer ``k``: ``token_layernorm`` (megatron's ``enorm``), ``hidden_layernorm`` (``hnorm``),
  ``input_proj`` over ``cat(hidden, token)`` (megatron's ``eh_proj`` halves swapped),
  ``final_layernorm``, plus a Qwen2 decoder layer.
* Export: SGLang 0.5.23 has no ``mimo`` config class and parses configs with ``AutoConfig``, so the
  export ships ``configuration_mimo.py`` + ``auto_map`` as MiMo's release does. SGLang's draft
  ``MiMoMTP`` maps every ``model.mtp_layers.k.`` onto ONE module, so exports carry depth 1.
  A model without q/k/v biases exports zero biases (exactly the same computation).
* SGLang's ``MiMoMTP`` zeroes the token embedding at position 0 (``hidden_states[positions == 0] = 0``,
  positions per request) and megatron's MTP layer does not, so a MiMo model sets
  ``mtp_zero_first_embedding``: our MTP forward zeroes it at each packed sequence's start and the
  trained heads compute what SGLang drafts with (tests/unit/test_mimo_draft_parity.py).
"""

from __future__ import annotations

from typing import Any

from megatron_mtp_rl.hf.families.base import Family, Reader, zero_bias_names
from megatron_mtp_rl.hf.mapping import MIMO
from megatron_mtp_rl.models.presets import ModelArgs

CONFIGURATION_MIMO = '''"""MiMo's configuration: Qwen2's plus the MTP depth (written by megatron-mtp-rl's export)."""

from transformers import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    def __init__(self, *args, num_nextn_predict_layers=0, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(*args, **kwargs)
'''


class MiMo(Family):
    name = "mimo"
    architecture = "MiMoForCausalLM"
    config_class = "Qwen2Config"
    accepts = ("MiMoForCausalLM", "mimo", "Qwen2ForCausalLM", "qwen2")
    flavour = MIMO
    draft_class = "MiMoMTP"
    draft_zeroes_first_embedding = True

    def specific(self, r: Reader, fields: dict[str, Any]) -> dict[str, Any]:
        self.partial_rotary(r, mapped=False)
        r.refuse_unless("attention_bias", (None, True, False))  # Qwen2 ignores it: q/k/v bias always
        if r.get("num_experts") or r.get("n_routed_experts"):
            r.refuse("num_experts", r.get("num_experts") or r.get("n_routed_experts"), "a dense Qwen2 family")
        return {"add_qkv_bias": True}

    def unrepresentable(self, m: ModelArgs) -> list[str]:
        out = self.common_unrepresentable(m)
        if m.is_moe:
            out.append("MiMo/Qwen2 is dense (use --num-experts 0)")
        if m.qk_layernorm:
            out.append("Qwen2 has no qk-norm (--qk-layernorm): export as qwen3")
        if m.rotary_percent != 1.0:
            out.append(f"Qwen2 rotates the whole head (--rotary-percent {m.rotary_percent})")
        if m.multi_latent_attention:
            out.append("MLA is DeepSeek-V3's")
        return out

    def hf_config(self, m: ModelArgs, depth: int) -> dict[str, Any]:
        cfg = self.base_config(m, depth)
        cfg.update(
            model_type="mimo",
            auto_map={"AutoConfig": "configuration_mimo.MiMoConfig"},
            use_sliding_window=False,
            attention_dropout=0.0,
        )
        return cfg

    def extra_files(self, m: ModelArgs) -> dict[str, str]:
        return {"configuration_mimo.py": CONFIGURATION_MIMO}

    def complete(self, hf: dict, m: ModelArgs, depth: int) -> dict:
        layers = [f"model.layers.{i}." for i in range(m.num_layers)] + [f"model.mtp_layers.{k}." for k in range(depth)]
        return zero_bias_names(hf, layers, ("q_proj", "k_proj", "v_proj"), lambda w: (w.shape[0],))


FAMILY = MiMo()
