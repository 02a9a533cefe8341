"""examples/recipes: every key is a flag, every layout validates, the memory arithmetic is current.

Each recipe names its world size and tokenizer vocabulary in ``# world-size:`` / ``# vocab-size:``
comment lines; its ``# --- estimate:`` block must equal what tools/estimate_memory.py prints for it
(regenerate the block when a recipe changes), and the launch command in its comment must parse.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.tool_loader import load_tool

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))


def _estimator():
    return load_tool("estimate_memory")


def _header(text: str, key: str) -> int:
    m = re.search(rf"^# {key}: (\d+)$", text, re.M)
    assert m, f"recipe lacks a '# {key}: N' line"
    return int(m.group(1))


def _parsed(path: Path):
    from megatron_mtp_rl.config import parse_config, resolve_model_args

    text = path.read_text(encoding="utf-8")
    cfg = parse_config(["--config", str(path)])
    return text, cfg, resolve_model_args(cfg, _header(text, "vocab-size"))


def test_there_are_recipes_for_each_family():
    names = {p.stem for p in RECIPES}
    assert {"mimo_7b_dapo_occ", "moonlight_16b_a3b_occ", "deepseek_v3_671b_layout", "qwen3_next_80b_a3b_occ"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses_and_validates(path):
    from megatron_mtp_rl.config import validate

    text, cfg, margs = _parsed(path)
    world = _header(text, "world-size")
    assert world % 8 == 0, "recipes are laid out for whole 8-GPU nodes"
    assert validate(cfg, world, margs) == []
    assert cfg.model.bf16 and cfg.rollout.rollout_engine == "sglang" and cfg.mtp.mtp_regime == "occ"
    assert margs.mtp_num_layers >= 1
    if margs.is_moe:
        # megatron-core raises in training for MoE + TP > 1 without sequence parallelism (ours is off)
        assert cfg.parallel.tensor_model_parallel_size == 1
    steps = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt // cfg.optim.global_batch_size
    assert steps > 1, "OCC needs more than one optimizer step per rollout batch (else d ≡ 0)"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_memory_estimate_block_is_current(path):
    text, cfg, margs = _parsed(path)
    m = re.search(r"^# --- estimate: tools/estimate_memory.py (.*)\n((?:#.*\n)*?)# --- end estimate$", text, re.M)
    assert m, "recipe lacks its '# --- estimate:' block"
    flags = m.group(1).split()
    assert flags[:2] == ["--config", str(path.relative_to(ROOT))]
    assert flags[2:] == [
        "--world-size",
        str(_header(text, "world-size")),
        "--vocab-size",
        str(_header(text, "vocab-size")),
    ]
    want = _estimator().estimate(cfg, margs, _header(text, "world-size"))
    have = [line.removeprefix("#   ") for line in m.group(2).splitlines()]
    assert have == want, "stale estimate: rerun tools/estimate_memory.py and paste its output"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_launch_command_in_the_comment_parses(path):
    """The documented launcher line (with its --sglang-* passthrough flags) is a valid command line."""
    from megatron_mtp_rl.config import parse_config

    lines = path.read_text(encoding="utf-8").splitlines()
    start = next(i for i, x in enumerate(lines) if re.match(r"#\s+(sbatch .*)?launchers/", x))
    cmd = []
    for x in lines[start:]:
        cmd.append(x.lstrip("#").strip().removesuffix("\\"))
        if not x.endswith("\\"):
            break
    argv = shlex.split(" ".join(cmd))
    script = next(i for i, a in enumerate(argv) if a.startswith("launchers/"))
    train_argv = [a for a in argv[script + 1 :] if a != "--dry-run"]
    cfg = parse_config(train_argv)
    assert cfg.config == str(path.relative_to(ROOT))
    assert "--speculative-algorithm" in cfg.rollout.sglang_engine_flags  # MTP layers draft in the rollouts


def test_unknown_and_sglang_keys_are_rejected(tmp_path):
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.errors import ConfigError

    bad = tmp_path / "bad.yaml"
    bad.write_text("num-layers: 2\nnum-layer: 3\n")
    with pytest.raises(ConfigError, match="bad.yaml:2: unknown key 'num-layer'"):
        parse_config(["--config", str(bad)])
    sgl = tmp_path / "sgl.yaml"
    sgl.write_text("sglang-mem-fraction-static: 0.2\n")
    with pytest.raises(ConfigError, match="unknown key 'sglang-mem-fraction-static'"):
        parse_config(["--config", str(sgl)])


@pytest.mark.parametrize(
    "preset, overrides",
    [
        ("tiny-dense", {}),
        ("tiny-dense", {"num_query_groups": 2, "untie_embeddings_and_output_weights": True, "vocab_size": 100}),
        ("tiny-moe", {"num_query_groups": 1, "mtp_num_layers": 1, "moe_ffn_hidden_size": 40}),
        # Qwen2/MiMo-style: q/k/v bias; Qwen3-style: qk-norm and a head dim ≠ hidden/heads
        ("tiny-dense", {"add_qkv_bias": True, "num_query_groups": 2}),
        ("tiny-dense", {"qk_layernorm": True, "kv_channels": 24, "untie_embeddings_and_output_weights": True}),
        # GLM-4.5-style MoE: dense first layer, shared expert (with a gate), bias, partial rotary
        (
            "tiny-moe",
            {
                "num_layers": 3,
                "moe_layer_freq": "([0]*1+[1]*2)",
                "moe_shared_expert_intermediate_size": 48,
                "moe_shared_expert_gate": True,
                "add_qkv_bias": True,
                "rotary_percent": 0.5,
                "moe_router_enable_expert_bias": True,
            },
        ),
    ],
)
def test_parameter_formula_counts_what_the_provider_builds(single_process, preset, overrides):
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.provider import count_parameters

    m = get_preset(preset).with_overrides(**overrides)
    assert _estimator().count_params(m).total == count_parameters(build_model(m, device="cpu"))
