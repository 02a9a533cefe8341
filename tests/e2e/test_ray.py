"""``mtp-rl train --ray``: the tiny job on a local Ray cluster (loopback) on CPU."""

import math

import pytest
import ray  # installed by the test extra

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.ray_launch import launch
from tests.e2e.test_train import FAST


@pytest.mark.parametrize(
    "placement, trainers, mode",
    [("disaggregated", 2, "sync"), pytest.param("disaggregated", 2, "async", marks=pytest.mark.slow)],
)
def test_two_rl_steps_on_ray(tmp_path, placement, trainers, mode):
    """Sync: every batch from the current weights. Async: the actor generates step n+1 while step n
    trains, one step off-policy (lag 0 for the first batch, then 1)."""
    cfg = parse_config(
        [
            *FAST,
            "--num-steps",
            "2",
            "--ray",
            "--ray-num-trainers",
            str(trainers),
            "--ray-rollout-placement",
            placement,
            "--metrics-jsonl",
            str(tmp_path / "m.jsonl"),
            *(["--async-rollout"] if mode == "async" else []),
        ]  # fmt: skip
    )
    try:
        hist = launch(cfg)
    finally:
        ray.shutdown()
    assert [h["step"] for h in hist] == [0, 1, 2]
    for h in hist[1:]:
        assert math.isfinite(h["train/policy_loss"]) and math.isfinite(h["occ/lambda_1"])
        # measured (not an empty 0), and tiny: every sample came from the pushed weights (the
        # replica starts from other ones), never before the push it depends on
        assert 0.0 < h["rollout/logprob_abs_diff"] < 1e-3, h["rollout/logprob_abs_diff"]
    # initial push (version 1) + one push after each step
    assert [h["rollout/weight_version"] for h in hist[1:]] == [2.0, 3.0]
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 3
    if mode == "async":
        assert [h["rollout/policy_lag"] for h in hist[1:]] == [0.0, 1.0]


def test_a_bad_ray_config_fails_in_one_line_before_ray_starts():
    from megatron_mtp_rl.config import validate
    from megatron_mtp_rl.errors import ConfigError

    if ray.is_initialized():
        ray.shutdown()
    cfg = parse_config([*FAST, "--ray", "--ray-num-trainers", "2", "--rollout-batch-size", "3"])
    with pytest.raises(ConfigError, match="--rollout-batch-size 3 is not divisible by the data-parallel size 2"):
        launch(cfg)
    assert not ray.is_initialized()
    # PP > 1 generates on the Ray rollout actor (a PP=1 replica), unlike the in-process local engine
    pp2 = parse_config([*FAST, "--ray", "--pipeline-model-parallel-size", "2"])
    assert not any("PP=1 only" in p for p in validate(pp2, 2))
    assert any("PP=1 only" in p for p in validate(parse_config([*FAST, "--pipeline-model-parallel-size", "2"]), 2))
