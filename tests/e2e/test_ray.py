"""``mtp-rl train --ray``: the tiny job on a local Ray cluster (loopback) on CPU."""

import math

import pytest
import ray  # installed by the test extra

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.ray_launch import launch
from tests.e2e.test_train import FAST


@pytest.mark.parametrize("placement, trainers, mode", [("disaggregated", 2, "sync"), ("disaggregated", 2, "async")])
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
    # initial push (version 1) + one push after each step
    assert [h["rollout/weight_version"] for h in hist[1:]] == [2.0, 3.0]
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 3
    if mode == "async":
        assert [h["rollout/policy_lag"] for h in hist[1:]] == [0.0, 1.0]
