"""On-policy distillation (--advantage-estimator opd) end to end: a teacher checkpoint scored like the KL reference."""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.train.loop import run_training
from tests.e2e.test_train import FAST


def _run(tmp_path, *extra):
    return run_training(parse_config([*FAST, "--metrics-jsonl", str(tmp_path / "m.jsonl"), *extra]))


def test_opd_two_steps_learn_from_the_teacher_alone(tmp_path):
    # The teacher: another initialisation, saved untrained. The untrained policy never earns a reward, so
    # the outcome (GRPO) advantage is 0 everywhere: every gradient below comes from the teacher's log-probs.
    # (With GRPO such a run has exactly zero gradients: no MTP, KL or entropy term either.)
    _run(tmp_path / "t", "--num-steps", "0", "--seed", "7", "--save", str(tmp_path / "teacher"))
    common = ("--num-steps", "2", "--mtp-regime", "none")
    opd = _run(tmp_path / "o", *common, "--advantage-estimator", "opd", "--teacher-load", str(tmp_path / "teacher"))
    assert all(h["rollout/reward_mean"] == 0.0 for h in opd[1:])
    assert all(h["train/grad_norm"] > 0.0 and math.isfinite(h["train/policy_loss"]) for h in opd[1:])
    # A teacher of another vocabulary is refused before anything is built.
    from megatron_mtp_rl.models.presets import ModelArgs
    from megatron_mtp_rl.train.builders import build_teacher
    from megatron_mtp_rl.train.saved_args import saved_model_args

    other = SimpleNamespace(model_args=replace(ModelArgs(**saved_model_args(str(tmp_path / "teacher"))), vocab_size=99))
    cfg = parse_config(["--advantage-estimator", "opd", "--teacher-load", str(tmp_path / "teacher")])
    with pytest.raises(ConfigError, match=r"the teacher's vocabulary \(\d+\) is not the policy's \(99\)"):
        build_teacher(cfg, other)


def test_a_missing_teacher_checkpoint_is_a_config_error(tmp_path):
    from megatron_mtp_rl.train.builders import build_teacher

    cfg = parse_config(["--advantage-estimator", "opd", "--teacher-load", str(tmp_path / "none")])
    with pytest.raises(ConfigError, match="no checkpoint there for the distillation teacher"):
        build_teacher(cfg, run=None)
    assert build_teacher(parse_config(["--teacher-load", str(tmp_path)]), run=None) is None  # not opd: no teacher
