"""The main job on 2 gloo processes with the local engine: DP=2, TP=2 (dense), EP=2 (MoE); λ is identical on both ranks.

EP=2 used to end in the θ_old pass: generation ran under ``torch.inference_mode``, so the buffer megatron's
token dispatcher caches for its EP all-gather was an inference tensor, and the trainer's gather into it failed.
"""

import math

import pytest

from tests.dist_utils import run_ranks
from tests.e2e.test_train import FAST


def _worker(rank, world, extra, out_dir):
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training

    cfg = parse_config([*FAST, "--num-steps", "2", "--metrics-jsonl", f"{out_dir}/m.jsonl", *extra])
    return run_training(cfg)


LAYOUTS = {
    "dp2": [],
    "tp2": ["--tensor-model-parallel-size", "2"],
    # micro-batches smaller than a generation batch (as at any real size): the trainer reuses what generation cached
    "ep2-moe": ["--preset", "tiny-moe", "--expert-model-parallel-size", "2", "--micro-batch-size", "1"],
}


@pytest.mark.parametrize("extra", list(LAYOUTS.values()), ids=list(LAYOUTS))
def test_two_process_job(tmp_path, extra):
    a, b = run_ranks(_worker, 2, tmp_path, extra, str(tmp_path))
    assert [h["step"] for h in a] == [0, 1, 2]
    for ha, hb in zip(a[1:], b[1:]):
        for k in ("occ/lambda_1", "occ/lambda_2"):
            assert ha[k] == hb[k] and math.isfinite(ha[k])
        assert ha["train/grad_norm"] == hb["train/grad_norm"]
        assert ha["train/param_norm_main"] == pytest.approx(hb["train/param_norm_main"], rel=1e-6)
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 3  # one writer
