"""KL to a reference checkpoint, DAPO, GSPO and every extension point, end to end (tiny-dense, 2 steps)."""

import math
from collections import Counter

import torch

from examples.extensions import advantages as ex_adv
from examples.extensions import group_filter as ex_filter
from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.rl.advantages import dynamic_sampling_mask
from megatron_mtp_rl.rollout.manager import RolloutManager
from megatron_mtp_rl.train.loop import run_training
from tests.e2e.test_train import FAST

CALLS = Counter()  # the counting wrappers below are loaded by dotted path (tests.e2e.test_algorithms:...)


def _run(tmp_path, *extra):
    return run_training(parse_config([*FAST, "--metrics-jsonl", str(tmp_path / "m.jsonl"), *extra]))


def test_kl_reference_is_the_loaded_checkpoint(tmp_path):
    _run(tmp_path / "a", "--num-steps", "0", "--save", str(tmp_path / "ckpt"))  # the initial weights
    # one update per step: the first update runs with policy == reference, so KL is exactly 0;
    # ce: the MTP loss moves the trunk even while every reward (and advantage) is 0
    hist = _run(tmp_path / "b", "--num-steps", "2", "--global-batch-size", "16", "--load", str(tmp_path / "ckpt"),
                "--finetune", "--kl-coef", "0.01", "--mtp-regime", "ce")  # fmt: skip
    assert hist[1]["train/kl"] == 0.0
    assert hist[2]["train/kl"] > 0.0 and math.isfinite(hist[2]["train/kl"])  # the policy moved, the reference did not


def test_dapo_drops_all_equal_groups(tmp_path):
    # An untrained model never answers right: every group is all-zero, so every group is dropped,
    # each of the 2 rounds regenerates all 4 groups, and the batch is topped up (shortfall 4).
    hist = _run(tmp_path, "--algorithm", "dapo", "--num-steps", "2", "--max-sampling-rounds", "2")
    for h in hist[1:]:
        assert h["rollout/filtered_groups"] == 8.0 and h["rollout/filter_shortfall"] == 4.0
        assert h["rollout/generated_samples"] == 2 * 4 * 4
        assert math.isfinite(h["train/policy_loss"]) and h["train/clipfrac"] >= 0.0


def test_dapo_filter_keeps_mixed_groups():
    rewards = torch.tensor([0.0, 0, 0, 1, 1, 1, 0.5, 0.5, 0.5, 1, 0, 1])
    assert dynamic_sampling_mask(rewards, 3).tolist() == [False] * 9 + [True] * 3  # only the mixed group
    assert ex_filter.drop_all_failed(rewards, 3).tolist() == [False] * 3 + [True] * 9


def test_gspo_two_steps(tmp_path):
    cfg = parse_config([*FAST, "--algorithm", "gspo"])
    assert cfg.algo.ratio_type == "sequence"
    hist = _run(tmp_path, "--algorithm", "gspo", "--num-steps", "2")
    for h in hist[1:]:
        assert math.isfinite(h["train/policy_loss"]) and math.isfinite(h["occ/lambda_1"])


def counting_filter(rewards, n):
    CALLS["filter"] += 1
    return ex_filter.drop_all_failed(rewards, n)


def counting_rloo(rewards, n, algo):
    CALLS["advantages"] += 1
    adv = ex_adv.rloo(rewards, n, algo)
    CALLS["zero_mean"] += int(bool(torch.allclose(adv.view(-1, n).mean(dim=1), torch.zeros(len(adv) // n))))
    return adv


def counting_rollout(manager: RolloutManager, fetch, **kw):
    CALLS["rollout"] += 1
    return RolloutManager.rollout(manager, fetch, **kw)


def test_every_extension_point_from_a_dotted_path(tmp_path):
    CALLS.clear()
    here = "tests.e2e.test_algorithms"
    hist = _run(
        tmp_path, "--num-steps", "2", "--reward-workers", "0",
        "--data-source", "examples.extensions.data_source:doubling",
        "--reward-fn", "examples.extensions.reward:exact_match_or_half",
        "--rollout-function", f"{here}:counting_rollout",
        "--dynamic-sampling", "--dynamic-sampling-filter", f"{here}:counting_filter", "--max-sampling-rounds", "1",
        "--advantage-estimator", f"{here}:counting_rloo",
    )  # fmt: skip
    assert hist[0]["eval/num_prompts"] == 6.0  # the doubling source's held-out set
    assert CALLS["rollout"] == 2 and CALLS["filter"] == 2 and CALLS["advantages"] == CALLS["zero_mean"] == 2
    hist = _run(tmp_path, "--num-steps", "1", "--rollout-function", "examples.extensions.rollout:with_length_stats")
    assert 1.0 <= hist[1]["rollout/response_len_max"] <= 4.0
