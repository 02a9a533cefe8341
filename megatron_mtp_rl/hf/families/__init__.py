"""HF model families: one module each (config.json ⇄ ModelArgs, tensor names, SGLang export).

The converter (``tools/convert_checkpoint.py``) and weight sync (``cluster/weight_sync.py``) both
pick a family here, so a checkpoint converts, trains and exports under one set of rules.

* :func:`detect` — the family of an HF ``config.json`` (``architectures`` / ``model_type``);
* :func:`family_for` — the family our model exports as (tiny-dense → MiMo, tiny-moe → GLM-4.5);
* :func:`get_family` — by name (``--hf-flavour``).
"""

from __future__ import annotations

from typing import Any

from megatron_mtp_rl.hf.families import deepseek_v3, glm4_moe, mimo, qwen3, qwen3_moe
from megatron_mtp_rl.hf.families.base import ExportInfo, Family, UnsupportedCheckpoint
from megatron_mtp_rl.models.presets import ModelArgs

FAMILIES: dict[str, Family] = {
    f.name: f for f in (mimo.FAMILY, qwen3.FAMILY, qwen3_moe.FAMILY, glm4_moe.FAMILY, deepseek_v3.FAMILY)
}

#: Architectures we know and refuse, with what is missing.
REFUSED = {
    "Qwen3NextForCausalLM": "Qwen3-Next is a Gated DeltaNet + gated-attention hybrid: it needs megatron-core's "
    "hybrid model (and FLA kernels) with MTP, which this project does not build",
    "qwen3_next": "see Qwen3NextForCausalLM",
    "DeepseekV32ForCausalLM": "DeepSeek-V3.2 adds DeepSeek sparse attention (an indexer), which is not mapped",
    "Glm4MoeLiteForCausalLM": "GLM-4.7-Flash (glm4_moe_lite) uses MLA with GLM naming, which is not mapped",
}

__all__ = [
    "FAMILIES",
    "ExportInfo",
    "Family",
    "UnsupportedCheckpoint",
    "detect",
    "family_for",
    "get_family",
    "model_args_for_hf_dir",
]


def get_family(name: str | Family) -> Family:
    if isinstance(name, Family):
        return name
    try:
        return FAMILIES[name]
    except KeyError:
        raise UnsupportedCheckpoint(f"unknown HF family {name!r}; choose one of {sorted(FAMILIES)}") from None


def detect(cfg: dict[str, Any]) -> Family:
    """The family of an HF config, from ``architectures`` then ``model_type``; unknown ones are refused."""
    names = [*(cfg.get("architectures") or []), cfg.get("model_type") or ""]
    for n in names:
        if n in REFUSED:
            why = REFUSED[n] if not REFUSED[n].startswith("see ") else REFUSED[REFUSED[n][4:]]
            raise UnsupportedCheckpoint(f"{n}: {why}")
        for fam in FAMILIES.values():
            if n in fam.accepts:
                return fam
    raise UnsupportedCheckpoint(
        f"architectures={cfg.get('architectures')!r} model_type={cfg.get('model_type')!r}: not a supported family "
        f"(supported: {', '.join(a for f in FAMILIES.values() for a in f.accepts[:1])})"
    )


def model_args_for_hf_dir(hf_dir: str, **overrides: Any) -> ModelArgs:
    """ModelArgs of an HF checkpoint directory (``train --load HF_DIR``): its family's reading of
    config.json, in the dtype holding most of its bytes (fp8 releases: bf16)."""
    from megatron_mtp_rl.hf.reader import HFCheckpoint, dominant_dtype

    ckpt = HFCheckpoint(hf_dir)
    fam = detect(ckpt.config)
    return fam.model_args(ckpt.config, **({"params_dtype": dominant_dtype(ckpt)} | overrides))


def family_for(m: ModelArgs, name: str | None = None) -> Family:
    """The family ``m`` exports as: ``name`` if given, else the one its features call for.

    MLA → DeepSeek-V3; sigmoid MoE → GLM-4.5; softmax MoE → Qwen3-MoE; dense with qk-norm → Qwen3;
    other dense → MiMo. Raises :class:`UnsupportedCheckpoint` when that family cannot hold ``m`` exactly.
    """
    if name is not None:
        fam = get_family(name)
    elif m.multi_latent_attention:
        fam = FAMILIES["deepseek_v3"]
    elif m.is_moe:
        fam = FAMILIES["glm4_moe" if m.moe_router_score_function == "sigmoid" else "qwen3_moe"]
    else:
        fam = FAMILIES["qwen3" if m.qk_layernorm else "mimo"]
    problems = fam.unrepresentable(m)
    if problems:
        raise UnsupportedCheckpoint(
            f"this model cannot be written as {fam.name} ({fam.architecture}): " + "; ".join(problems)
        )
    return fam
