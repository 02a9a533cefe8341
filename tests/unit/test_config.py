"""The run config: flags generated from the fields, YAML checked like the command line, one validate()."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mtp_rl import config as C
from megatron_mtp_rl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _yaml(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize(
    "text, message",
    [
        ("seed: 1\nnum-steps: 1.5\n", r"c.yaml:2: num-steps: expected an integer, got 1.5"),
        ('quiet: "false"\n', r"c.yaml:1: quiet: expected true or false, got the string 'false'"),
        ("mtp-regime: occc\n", r"c.yaml:1: mtp-regime: expected one of none, detach, ce, policy, occ, got 'occc'"),
        ("lr: [1, 2]\n", r"c.yaml:1: lr: expected a single value \(a number\), got a list"),
        ("global-batch-size: 0\n", r"c.yaml:1: global-batch-size: must be ≥ 1, got 0"),
        ("num-step: 2\n", r"c.yaml:1: unknown key 'num-step'"),
    ],
)
def test_yaml_values_are_checked_like_flags(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message) as e:
        C.parse_config(["--config", _yaml(tmp_path, text)])
    assert "\n" not in str(e.value)  # one line per problem


def test_every_yaml_problem_in_one_message(tmp_path):
    with pytest.raises(ConfigError) as e:
        C.parse_config(["--config", _yaml(tmp_path, "num-steps: 1.5\nquiet: 3\n")])
    assert str(e.value).splitlines() == [
        f"{tmp_path}/c.yaml:1: num-steps: expected an integer, got 1.5",
        f"{tmp_path}/c.yaml:2: quiet: expected true or false, got 3",
    ]


def test_command_line_over_yaml_over_presets(tmp_path):
    path = _yaml(tmp_path, "algorithm: dapo\neps-clip-high: 0.3\nnum-steps: 5\n")
    cfg = C.parse_config(["--config", path, "--num-steps", "7"])
    assert cfg.num_steps == 7 and cfg.algo.eps_clip_high == 0.3  # YAML beats the dapo preset (0.28)
    assert cfg.algo.dynamic_sampling and cfg.algo.overlong_buffer_len == 4  # dapo preset
    assert C.parse_config(["--algorithm", "dapo", "--no-dynamic-sampling"]).algo.dynamic_sampling is False
    gspo = C.parse_config(["--algorithm", "gspo"]).algo
    assert (gspo.ratio_type, gspo.eps_clip, gspo.loss_agg_mode) == ("sequence", 3e-4, "seq-mean-token-mean")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_steps = 3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--num-step", "2"], "unrecognized arguments: --num-step"),
        (["--global-batch-size", "0"], "argument --global-batch-size: must be ≥ 1, got 0"),
        (["--task", "arith"], "unrecognized arguments: --task"),
    ],
)
def test_command_line_refuses(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_config(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_defaults_and_derived_values():
    cfg = C.parse_config([])
    assert cfg.optim.global_batch_size == 16 * 8 // 2 and cfg.data.tokenizer == "arith"
    assert cfg.rollout.reward_fn == "exact_match" and cfg.model.num_layers is None  # None: the preset decides
    m = C.resolve_model_args(C.parse_config(["--preset", "tiny-dense", "--num-layers", "4", "--num-experts", "0"]), 18)
    assert (m.num_layers, m.num_experts, m.vocab_size, m.seq_length) == (4, None, 18, 64)
    assert C.parse_config(["--sglang-mem-fraction-static", "0.5"]).rollout.sglang_engine_flags == (
        "--mem-fraction-static",
        "0.5",
    )


def test_validate_lists_every_problem():
    cfg = C.parse_config(
        ["--preset", "tiny-dense", "--kl-coef", "0.1", "--occ-min", "2", "--tensor-model-parallel-size", "3"]
    )
    problems = C.validate(cfg, 3)
    assert any("--kl-coef 0.1 needs a reference model" in p for p in problems)
    assert any("--occ-min 2.0 is larger than --occ-max 1.0" in p for p in problems)
    assert any("does not divide --num-attention-heads 4" in p for p in problems)
    bad = cfg.replace(optim__micro_batch_size=0)  # built in code, not from flags: still checked
    assert "--micro-batch-size: must be ≥ 1, got 0" in C.validate(bad, 1)


def test_pretrain_refuses_a_regime():
    with pytest.raises(ConfigError, match="mtp-rl pretrain always trains the main and MTP heads with cross-entropy"):
        C.parse_config(["--mtp-regime", "occ"], command="pretrain")
    cfg = C.parse_config([], command="pretrain")
    assert (cfg.num_steps, cfg.optim.lr, cfg.command) == (300, 1e-3, "pretrain")


def test_choices_mirror_the_rl_modules():
    from megatron_mtp_rl.rl.occ import BASELINES, REDUCE_MODES
    from megatron_mtp_rl.rl.policy_loss import AGG_MODES, KL_TYPES
    from megatron_mtp_rl.rl.regimes import REGIMES
    from megatron_mtp_rl.rl.rollout_correction import LEVELS

    assert C.CORRECTION_LEVELS == LEVELS
    assert (C.REGIMES, C.AGG_MODES, C.KL_TYPES) == (REGIMES, AGG_MODES, KL_TYPES)
    assert (C.OCC_BASELINES, C.OCC_REDUCE_MODES) == (BASELINES, REDUCE_MODES)


def test_cli_prints_one_line_errors_and_help_needs_no_torch(tmp_path):
    bad = _yaml(tmp_path, "num-steps: 1.5\n")
    code = (
        "import sys\nfrom megatron_mtp_rl.cli import main\n"
        "try:\n    rc = main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
        "assert 'torch' not in sys.modules, 'torch imported'\nsys.exit(rc)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "train", "--config", bad], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 2 and out.stderr == f"error: {bad}:1: num-steps: expected an integer, got 1.5\n"
    out = subprocess.run([sys.executable, "-c", code, "train", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "--dynamic-sampling-filter" in out.stdout, out.stderr[-500:]


def test_long_generation_flags_are_checked():
    from megatron_mtp_rl.config import parse_config, validate

    def problems(*flags):
        return validate(parse_config(list(flags)), 1)

    assert problems("--partial-rollout", "--max-off-policy-steps", "2", "--rollout-is-cap", "2") == []
    assert problems("--over-sampling-batch-size", "32") == ["--over-sampling-batch-size needs --partial-rollout"]
    assert "below --rollout-batch-size" in problems("--partial-rollout", "--over-sampling-batch-size", "4")[0]
    assert (
        "--rollout-temperature must be 1" in problems("--max-off-policy-steps", "2", "--rollout-temperature", "0.5")[0]
    )
    assert "--rollout-function" in problems("--partial-rollout", "--rollout-function", "a:b")[0]
