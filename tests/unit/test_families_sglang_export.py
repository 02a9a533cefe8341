"""Each family's export (weight sync's ``export_hf``, the path rollouts use) against SGLang 0.5.23 and transformers.

* ``AutoConfig.from_pretrained(dir, trust_remote_code=True)`` parses the config.json (MiMo through our
  ``configuration_mimo.py`` + ``auto_map``, as MiMo's release does);
* every config key SGLang's model code reads without a default is there (tests/fixtures/sglang_models.json,
  extracted from the wheel by ``tools/check_sglang_schema.py --models``);
* the trunk tensors are exactly the names and shapes transformers' own class writes for that config;
* every name is made of module names SGLang's model (or its loader's checkpoint names) knows;
* SGLang's draft class for the family finds the MTP weights under the names its loader maps, and the
  export carries no more MTP layers than that draft takes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

FIXTURE = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "sglang_models.json").read_text())

#: read by SGLang only on paths our exports do not take
NOT_ON_OUR_PATH = {
    "quantization_config": "quantized checkpoints only",
    "pad_token_id": "transformers' default None is what SGLang gets",
    "moe_layer_freq": "DeepSeek-V2-Lite layouts; first_k_dense_replace decides for V3",
    "rope_theta": "transformers 5 configs carry rope_parameters, which SGLang reads first",
    "rope_scaling": "as rope_theta",
}

MODELS = {
    "mimo": ("tiny-dense", {}),
    "glm4_moe": ("tiny-moe", {}),
    "glm4_moe_full": ("tiny-moe", dict(num_layers=3, add_qkv_bias=True, qk_layernorm=True, kv_channels=32,
                                       rotary_percent=0.5, moe_layer_freq="([0]*1+[1]*2)",
                                       moe_shared_expert_intermediate_size=96, moe_router_enable_expert_bias=True,
                                       moe_router_num_groups=2, moe_router_group_topk=1,
                                       moe_router_topk_scaling_factor=2.5)),
    "qwen3": ("tiny-dense", dict(qk_layernorm=True, kv_channels=32, mtp_num_layers=1)),
    "qwen3_moe": ("tiny-moe", dict(qk_layernorm=True, kv_channels=32, moe_router_score_function="softmax")),
}  # fmt: skip


def _export(tmp_path: Path, case: str) -> tuple[Path, object, str]:
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.cluster.weight_sync import export_hf
    from megatron_mtp_rl.hf.families import family_for
    from megatron_mtp_rl.models import build_model, get_preset

    preset, overrides = MODELS[case]
    margs = get_preset(preset).with_overrides(vocab_size=100, **overrides)
    family = family_for(margs).name  # the model's own family: nothing named by hand
    platform.seed_everything(3)
    model = build_model(margs, device="cpu")
    return export_hf(model, margs, tmp_path / case, None), margs, family


def _names_shapes_transformers_writes(cfg, arch: str, tmp: Path) -> dict[str, tuple]:
    """What transformers' own class saves for this config (the checkpoint layout SGLang reads)."""
    from safetensors import safe_open

    cls = getattr(transformers, "Qwen2ForCausalLM" if arch == "MiMoForCausalLM" else arch)
    with torch.device("cpu"):
        model = cls._from_config(cfg, dtype=torch.float32)
    model.save_pretrained(tmp)
    out = {}
    for f in tmp.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            for n in sf.keys():
                t = sf.get_slice(n)
                shape = tuple(t.get_shape())
                if 0 not in shape:  # zero-width modules (n_shared_experts=0) are exactly nothing
                    out[n] = shape
    return out


@pytest.mark.parametrize("case", sorted(MODELS))
def test_export_loads_as_the_family_sglang_expects(single_process, tmp_path, case):
    from safetensors.torch import load_file

    from megatron_mtp_rl.hf.families import get_family

    out, margs, family = _export(tmp_path, case)
    cfg = transformers.AutoConfig.from_pretrained(out, trust_remote_code=True)
    arch = cfg.architectures[0]
    spec = FIXTURE["architectures"][arch]
    missing = [k for k in spec["config_keys_direct"] if not hasattr(cfg, k) and k not in NOT_ON_OUR_PATH]
    assert not missing, f"{arch}: config keys SGLang reads are missing: {missing}"

    tensors = load_file(str(out / "model.safetensors"))
    draft = FIXTURE["drafts"].get(arch)
    L = cfg.num_hidden_layers
    mtp = {n for n in tensors if n.startswith(("model.mtp_layers.", "mtp.")) or re.match(rf"model\.layers\.{L}\.", n)}
    trunk = {n: tuple(t.shape) for n, t in tensors.items() if n not in mtp}
    expect = _names_shapes_transformers_writes(cfg, arch, tmp_path / "ref")
    if cfg.tie_word_embeddings and not get_family(family).served_class_ties:
        # SGLang's class ignores the tie and reads lm_head.weight: the tied head, written explicitly
        expect["lm_head.weight"] = expect["model.embed_tokens.weight"]
        assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])
    assert trunk == expect

    known = set(spec["module_attributes"]) | set(spec["checkpoint_shard_names"]) | {"weight", "bias"}
    if draft:
        known |= set(draft["module_attributes"]) | {p for n in draft["mtp_only_names"] for p in n.split(".")}
    for name in tensors:
        pieces = [p for p in name.split(".") if not p.isdigit()]
        assert set(pieces) <= known, f"{name}: {sorted(set(pieces) - known)} unknown to SGLang's {arch}"

    if family == "mimo":  # SGLang's Qwen2 attention always has q/k/v biases
        for i in range(L):
            assert all(f"model.layers.{i}.self_attn.{p}_proj.bias" in tensors for p in "qkv")
    if family == "qwen3":  # no SGLang draft, and its loader would fail on mtp.* names: none exported
        assert not mtp and cfg.num_nextn_predict_layers == 0
        return
    if not margs.mtp_num_layers:
        return
    assert draft is not None and draft["registered"], f"SGLang 0.5.23 has no MTP draft for {arch}"
    assert cfg.num_nextn_predict_layers == 1 <= draft["max_depth"]
    assert mtp, "the export carries no MTP weights"
    if draft["class"] == "MiMoMTP":  # model.mtp_layers.k.X → model.X (MTP-only) or model.mtp_block.X
        assert {int(n.split(".")[2]) for n in mtp} == {0}
        found = {n.split(".", 3)[3].split(".")[0] for n in mtp}
        assert set(draft["mtp_only_names"]) <= found and "self_attn" in found and "mlp" in found
    elif draft["class"] == "Qwen3MoeForCausalLMMTP":  # mtp.fc … kept, mtp.layers.0.* → model.layers.0.*
        assert set(draft["mtp_only_names"]) <= mtp and "mtp.norm.weight" in mtp
        assert any(n.startswith("mtp.layers.0.self_attn.") for n in mtp)
    else:  # NextN: model.layers.{L}.{enorm, hnorm, eh_proj, shared_head.norm} + model.layers.{L}.<decoder layer>
        for piece in draft["mtp_only_names"]:
            assert f"model.layers.{L}.{piece}.weight" in mtp, piece
        assert any(n.startswith(f"model.layers.{L}.mlp.experts.") for n in mtp)
        assert not any(n.startswith(f"model.layers.{L + 1}.") for n in tensors)


def test_presets_export_as_mimo_and_glm45():
    from megatron_mtp_rl.hf.families import family_for
    from megatron_mtp_rl.models import get_preset

    assert family_for(get_preset("tiny-dense")).architecture == "MiMoForCausalLM"
    assert family_for(get_preset("tiny-moe")).architecture == "Glm4MoeForCausalLM"  # a GQA MoE family, not DeepSeek


def test_unexportable_model_is_refused_naming_why():
    from megatron_mtp_rl.hf.families import UnsupportedCheckpoint, family_for
    from megatron_mtp_rl.models import get_preset

    with pytest.raises(UnsupportedCheckpoint, match="Qwen3 always has q/k RMSNorm"):
        family_for(get_preset("tiny-moe").with_overrides(moe_router_score_function="softmax"))
    with pytest.raises(UnsupportedCheckpoint, match="MLA"):
        family_for(get_preset("tiny-moe"), "deepseek_v3")


def test_deepseek_export_names_match_the_nextn_draft(tmp_path):
    """MLA cannot be built on CPU: DeepSeek-V3's export names come from the mapping (as weight sync sends them)."""
    from dataclasses import replace

    from megatron_mtp_rl.hf.families import detect
    from megatron_mtp_rl.hf.mapping import hf_to_megatron, megatron_to_hf
    from tests.unit.test_families_mla import make_deepseek

    src = make_deepseek(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    fam = detect(cfg)
    m = fam.model_args(cfg)
    lean = replace(fam.flavour, mtp_embed_head_copies=False)  # weight sync: SGLang shares the target's
    sent = megatron_to_hf(hf_to_megatron(src, m, fam.flavour), m, lean)
    spec, draft = FIXTURE["architectures"]["DeepseekV3ForCausalLM"], FIXTURE["drafts"]["DeepseekV3ForCausalLM"]
    known = set(spec["module_attributes"]) | set(spec["checkpoint_shard_names"]) | {"weight", "bias"}
    known |= set(draft["module_attributes"]) | {p for n in draft["mtp_only_names"] for p in n.split(".")}
    for name in sent:
        assert {p for p in name.split(".") if not p.isdigit()} <= known, name
    exported = fam.hf_config(m, 1)
    parsed = transformers.DeepseekV3Config(**{k: v for k, v in exported.items() if k != "architectures"})
    assert not [k for k in spec["config_keys_direct"] if not hasattr(parsed, k) and k not in NOT_ON_OUR_PATH]
    for piece in draft["mtp_only_names"]:
        assert f"model.layers.2.{piece}.weight" in sent
