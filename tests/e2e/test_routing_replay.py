"""R3 / R2 through the trainer (tiny-moe, bf16 local engine, fp32 trainer): the engine's routes reach
the old-logprob pass (agreement measured), the corrections run, the step trains."""

import math

import pytest

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.loop import run_training
from tests.e2e.test_train import FAST


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [
        ["--use-rollout-routing-replay", "--rollout-is", "geometric", "--rollout-is-cap", "2"],
        ["--use-rollout-routing-replay", "--async-rollout"],  # the process engine records in its child
        [
            "--use-routing-replay",
            "--rollout-rs",
            "token",
            "--rollout-rs-bounds",
            "0.5,2",
            "--rollout-veto-threshold",
            "0.01",
        ],  # fmt: skip
    ],
)
def test_routing_replay_steps(tmp_path, extra):
    hist = run_training(
        parse_config(
            [
                *FAST,
                "--preset",
                "tiny-moe",
                "--num-steps",
                "1",
                "--rollout-dtype",
                "bfloat16",
                "--metrics-jsonl",
                str(tmp_path / "m.jsonl"),
                *extra,
            ]
        )  # fmt: skip
    )
    m = hist[1]
    assert 0.0 < m["rollout/routing_agreement"] <= 1.0
    assert math.isfinite(m["train/policy_loss"]) and m["rollout/mismatch_kl"] >= 0.0
    keys = {
        "--rollout-is": "is_weight_mean",
        "--rollout-rs": "rs_masked_fraction",
        "--rollout-veto-threshold": "veto_fraction",
    }
    for flag, key in keys.items():
        assert (f"rollout_correction/{key}" in m) == (flag in extra)
