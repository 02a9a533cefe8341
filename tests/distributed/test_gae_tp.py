"""PPO with a critic on 2 gloo processes with TP=2: the value head's TP shards give both ranks one critic."""

import math

import pytest

from tests.dist_utils import run_ranks
from tests.e2e.test_gae import CRITIC_KEYS, GAE
from tests.e2e.test_train import FAST


def _worker(rank, world, out_dir):
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training

    cfg = parse_config([*FAST, *GAE, "--num-steps", "2", "--tensor-model-parallel-size", "2",
                        "--metrics-jsonl", f"{out_dir}/m.jsonl"])  # fmt: skip
    return run_training(cfg)


@pytest.mark.slow  # TP=2: test_two_process_job[tp2] and the log-prob tests are the fast ones
def test_gae_with_tensor_parallel_critic(tmp_path):
    a, b = run_ranks(_worker, 2, tmp_path, str(tmp_path))
    assert [h["step"] for h in a] == [0, 1, 2]
    for ha, hb in zip(a[1:], b[1:]):
        for k in CRITIC_KEYS:
            assert math.isfinite(ha[k]) and ha[k] == hb[k], k
    assert "train/policy_loss" not in a[1] and math.isfinite(a[2]["train/policy_loss"])
    assert a[1]["critic/values_mean"] != a[2]["critic/values_mean"]
