"""PP=2 × DP=2: token-budget micro-batches dealt by tokens give the gradients of fixed micro-batches."""

import random

import pytest
import torch

from tests.dist_utils import run_ranks

# Lengths (prompt, response) chosen so the two DP ranks' natural micro-batch counts differ.
LENGTHS = [(4, 30), (3, 2), (5, 28), (4, 3), (3, 25), (6, 4), (4, 2), (3, 5),
           (5, 3), (4, 6), (3, 4), (5, 2), (4, 3), (6, 2), (3, 3), (4, 5)]  # fmt: skip


def _worker(rank, world):
    from megatron.core import parallel_state

    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.state import full_name
    from megatron_mtp_rl.rl import OCCConfig, OCCEstimator, RLLoss, RLLossConfig
    from megatron_mtp_rl.rl.loss import step_denominators
    from megatron_mtp_rl.train.microbatches import balanced_minibatches, same_count_micro_batches, token_bins
    from megatron_mtp_rl.train.optim import wrap_ddp
    from megatron_mtp_rl.train.schedule import configure, forward_backward
    from megatron_mtp_rl.train.step import build_micro_batches, compute_old_logprobs
    from tests.distributed.workers import grads_by_name
    from tests.unit.test_microbatches import make_samples, perturb

    platform.initialize(platform.ParallelSizes(pipeline_model_parallel_size=2), seed=5)
    model = wrap_ddp(build_model(get_preset("tiny-dense")))
    configure(model)
    dp_rank, dp_group = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_group()
    samples = make_samples(LENGTHS)
    adv = torch.randn(len(samples), generator=torch.Generator().manual_seed(1)).tolist()
    last = parallel_state.is_pipeline_last_stage()

    def grads(batches):
        compute_old_logprobs(model, batches, with_mtp=True)
        if last:
            perturb(batches)
        cfg = RLLossConfig(mtp_regime="occ", kl_coef=0.1)
        occ = OCCEstimator(2, OCCConfig(init=0.3), group=dp_group)
        fn = RLLoss(cfg, step_denominators(batches, 2, group=dp_group), occ)
        model.zero_grad_buffer()
        forward_backward(model, batches, fn, **fn.forward_kwargs())
        lambdas = occ.reduce()["occ/lambda_1"] if last else None
        return {full_name(model.module, k): v for k, v in grads_by_name(model).items()}, lambdas

    mine = list(range(8 * dp_rank, 8 * dp_rank + 8))  # fixed: 8 samples per rank, 2 per micro-batch
    fixed = build_micro_batches([samples[i] for i in mine], [adv[i] for i in mine], 2, 40, True)
    order = list(range(len(samples)))
    random.Random(7).shuffle(order)
    ids = balanced_minibatches(samples, order, 16, 2, dp_rank)[0]
    part = ([samples[i] for i in ids], [adv[i] for i in ids], ids)
    natural = len(token_bins([len(s.prompt_ids) + len(s.response_ids) for s in part[0]], 48))
    dynamic = same_count_micro_batches([part], 48, equal_counts=True)[0]
    g_fixed, lam_fixed = grads(fixed)
    g_dyn, lam_dyn = grads(dynamic)
    tokens = sum(int((b.segment_ids > 0).sum()) for b in dynamic)
    return dict(fixed=g_fixed, dynamic=g_dyn, lam=(lam_fixed, lam_dyn), natural=natural, count=len(dynamic),
                tokens=tokens, ids=ids, last=last)  # fmt: skip


@pytest.mark.slow  # 4 processes: ~40 s on 2 idle cores
def test_pp2_dp2_dynamic_balanced_equals_fixed(tmp_path):
    ranks = run_ranks(_worker, 4, tmp_path)
    dp_ranks = [r for r in ranks if r["last"]]
    assert len(dp_ranks) == 2
    assert sorted(i for r in dp_ranks for i in r["ids"]) == list(range(16))  # every sample once
    assert dp_ranks[0]["natural"] != dp_ranks[1]["natural"]  # the count had to be equalised
    assert all(r["count"] == max(x["natural"] for x in dp_ranks) for r in ranks)
    tok = [r["tokens"] for r in dp_ranks]
    assert max(tok) / (sum(tok) / 2) <= 1.1  # dealt by tokens
    for r in ranks:
        assert r["fixed"].keys() == r["dynamic"].keys()
        for n, g in r["fixed"].items():
            torch.testing.assert_close(r["dynamic"][n], g, rtol=1e-4, atol=1e-7, msg=n)
        if r["last"]:
            assert r["lam"][0] != 0.3 and abs(r["lam"][0] - r["lam"][1]) <= 1e-5 * abs(r["lam"][0])
