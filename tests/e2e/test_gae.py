"""PPO with a critic (``--advantage-estimator gae``) end to end: warm-up, both updates, exact resume."""

import math

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.loop import run_training
from tests.e2e.test_train import FAST, _strip

GAE = ["--advantage-estimator", "gae", "--critic-warmup-steps", "1", "--critic-lr", "3e-3", "--lam", "0.95",
       "--num-eval-prompts", "0", "--global-batch-size", "16", "--micro-batch-size", "8"]  # fmt: skip
CRITIC_KEYS = ["critic/value_loss", "critic/values_mean", "critic/clipfrac", "critic/grad_norm"]


def _run(tmp_path, *extra):
    return run_training(parse_config([*FAST, *GAE, "--metrics-jsonl", str(tmp_path / "m.jsonl"), *extra]))


def test_gae_two_steps_then_an_exact_resume_of_the_second(tmp_path):
    straight = _run(tmp_path / "a", "--num-steps", "2")
    for row in straight[1:]:
        for k in CRITIC_KEYS:
            assert math.isfinite(row[k]), k
    assert "train/policy_loss" not in straight[1]  # warm-up: only the critic trains
    assert math.isfinite(straight[2]["train/policy_loss"])
    assert straight[1]["critic/values_mean"] != straight[2]["critic/values_mean"]

    ckpt = str(tmp_path / "ckpt")
    first = _run(tmp_path / "b", "--num-steps", "1", "--save", ckpt)
    assert (tmp_path / "ckpt" / "iter_0000001" / "critic" / ".metadata").exists()
    resumed = _run(tmp_path / "b", "--num-steps", "2", "--load", ckpt, "--save", ckpt)
    assert [h["step"] for h in resumed] == [2]
    # the critic (and its Adam state) came back (the 1-step run also evaluated at its last step)
    assert _no_eval(first[1:] + resumed) == _no_eval(straight[1:])


def _no_eval(rows):
    return [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in _strip(rows)]
