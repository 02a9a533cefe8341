"""End-to-end RL runs of the main job on CPU (tiny models, a few steps)."""

import json
import math

import pytest

from megatron_mtp_rl.config import REGIMES, parse_config
from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.train.loop import run_training

FAST = [
    "--preset", "tiny-dense", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
    "--rollout-max-response-len", "4", "--global-batch-size", "8", "--micro-batch-size", "4",
    "--seq-length", "16", "--num-eval-prompts", "8", "--eval-interval", "2", "--lr", "1e-3", "--quiet",
]  # fmt: skip

REQUIRED = [
    "rollout/reward_mean", "rollout/accuracy", "rollout/response_len", "train/policy_loss",
    "train/grad_norm", "train/param_norm_main", "perf/step_time", "perf/rollout_time",
    "perf/train_time", "perf/tokens_per_s",
]  # fmt: skip
MTP_KEYS = ["mtp/loss_1", "mtp/loss_2", "mtp/accept_1", "mtp/accept_2", "mtp/logprob_1", "mtp/top1_agree_1"]
OCC_KEYS = ["occ/lambda_1", "occ/lambda_2", "occ/alignment_1", "occ/variance_2", "occ/tokens", "occ/guard_events"]


def _run(tmp_path, *extra):
    cfg = parse_config([*FAST, "--metrics-jsonl", str(tmp_path / "m.jsonl"), *extra])
    return run_training(cfg)


def _finite(row, keys):
    for k in keys:
        assert k in row, k
        assert isinstance(row[k], float) and math.isfinite(row[k]), (k, row[k])


@pytest.mark.parametrize("regime", REGIMES)
def test_three_steps_each_regime_tiny_dense(tmp_path, regime):
    hist = _run(tmp_path, "--num-steps", "3", "--mtp-regime", regime)
    assert [h["step"] for h in hist] == [0, 1, 2, 3]
    assert "eval/accuracy" in hist[0] and "eval/accuracy" in hist[2] and "eval/accuracy" in hist[3]
    for row in hist[1:]:
        _finite(row, REQUIRED)
        if regime != "none":
            _finite(row, MTP_KEYS)
            _finite(row, OCC_KEYS)
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[3]["train/param_norm_main"] == pytest.approx(hist[3]["train/param_norm_main"])


def test_one_step_tiny_moe_with_spec_decode(tmp_path):
    hist = _run(tmp_path, "--preset", "tiny-moe", "--num-steps", "1", "--local-spec-decode")
    _finite(hist[1], REQUIRED + MTP_KEYS + OCC_KEYS + ["rollout/spec_accept_len"])
    assert hist[1]["rollout/spec_accept_len"] >= 1.0


def test_detach_leaves_the_main_model_as_none_and_ce_does_not(tmp_path):
    runs = {r: _run(tmp_path / r, "--num-steps", "3", "--mtp-regime", r) for r in ("none", "detach", "ce")}
    none = [h["train/param_norm_main"] for h in runs["none"][1:]]
    detach = [h["train/param_norm_main"] for h in runs["detach"][1:]]
    ce = [h["train/param_norm_main"] for h in runs["ce"][1:]]
    assert detach == none  # exactly: same seed, MTP gradients never reach the main model
    assert ce != none
    assert [h["rollout/reward_mean"] for h in runs["detach"][1:]] == [
        h["rollout/reward_mean"] for h in runs["none"][1:]
    ]


def _strip(rows):
    return [{k: v for k, v in r.items() if not k.startswith("perf/") and k != "rollout/gen_tokens_per_s"} for r in rows]


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    straight = _run(tmp_path / "a", "--num-steps", "4")
    first = _run(tmp_path / "b", "--num-steps", "2", "--save", str(tmp_path / "ckpt"))
    resumed = _run(
        tmp_path / "b", "--num-steps", "4", "--load", str(tmp_path / "ckpt"), "--save", str(tmp_path / "ckpt")
    )
    assert [h["step"] for h in resumed] == [3, 4]
    assert _strip(first[1:] + resumed) == _strip(straight[1:])
    rows = [json.loads(x) for x in (tmp_path / "b" / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]


def test_config_file_and_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num-steps: 1\nmtp_regime: detach\n")
    run = parse_config([*FAST, "--config", str(cfg)])
    assert run.num_steps == 1 and run.mtp.mtp_regime == "detach"
    run = parse_config([*FAST, "--config", str(cfg), "--num-steps", "2"])
    assert run.num_steps == 2  # the command line wins over the file
    bad = tmp_path / "bad.yaml"
    bad.write_text("num-steps: 1\n\nnot-a-flag: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml:3: unknown key 'not-a-flag'"):
        parse_config(["--config", str(bad)])


def test_prompt_file_with_math_verify_and_a_custom_reward(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"problem": f"{i}+{i}", "answer": str(2 * i)}) for i in range(6)) + "\n")
    common = ["--prompt-data", str(data), "--eval-data", str(data), "--input-key", "problem",
              "--label-key", "answer", "--seq-length", "24", "--num-steps", "1"]  # fmt: skip
    hist = _run(tmp_path, *common)  # byte tokenizer + math_verify by default for files
    _finite(hist[1], REQUIRED)
    assert hist[0]["eval/num_prompts"] == 6.0
    hist = _run(tmp_path, *common, "--reward-fn", "tests.unit.test_data_rewards:always_half")
    assert hist[1]["rollout/reward_mean"] == 0.5
