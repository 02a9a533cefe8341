"""Token-budget micro-batches and DP balance: the grouping changes neither gradients nor statistics."""

import random

import pytest
import torch

from megatron_mtp_rl.errors import DataError
from megatron_mtp_rl.rl import OCCConfig, OCCEstimator, RLLoss, RLLossConfig
from megatron_mtp_rl.rl.loss import step_denominators
from megatron_mtp_rl.rollout.manager import Sample
from megatron_mtp_rl.train.microbatches import (
    balanced_minibatches,
    balanced_parts,
    sample_length,
    token_bins,
    token_micro_batches,
)


def make_samples(lengths: list[tuple[int, int]], seed: int = 4) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for p, r in lengths:
        ids = torch.randint(1, 60, (p + r,), generator=g).tolist()
        out.append(Sample(None, ids[:p], ids[p:], [], "", True))
    return out


def perturb(batches) -> None:
    """θ_old and the reference differ from θ by a fixed function of each label: layout-independent."""
    for b in batches:
        wiggle = torch.cos(b.labels.float() * 1.3) * b.loss_mask
        b.ref_logprobs = b.old_logprobs - 0.03 * torch.sin(b.labels.float() * 0.7) * b.loss_mask
        b.old_logprobs = b.old_logprobs + 0.05 * wiggle
        if b.old_mtp_logprobs is not None:
            b.old_mtp_logprobs = b.old_mtp_logprobs - 0.04 * wiggle


CONFIGS = {
    "grpo": dict(mtp_regime="none"),
    "dapo": dict(mtp_regime="none", eps_clip_high=0.28, loss_agg_mode="token-mean"),
    "gspo": dict(mtp_regime="none", ratio_type="sequence", eps_clip=3e-4, eps_clip_high=4e-4,
                 loss_agg_mode="seq-mean-token-mean"),
    "kl": dict(mtp_regime="none", kl_coef=0.1, kl_type="k3", entropy_coef=0.01, loss_agg_mode="seq-mean-token-sum"),
    "occ": dict(mtp_regime="occ"),
    "policy": dict(mtp_regime="policy", mtp_loss_coef=0.3),
    "head_ce": dict(mtp_regime="detach", mtp_head_loss="ce", mtp_head_coef=0.5),
}  # fmt: skip


def _run(model, batches, name):
    from megatron_mtp_rl.train.schedule import forward_backward
    from megatron_mtp_rl.train.step import reduce_metrics

    cfg = RLLossConfig(**CONFIGS[name])
    occ = OCCEstimator(2, OCCConfig(init=0.3))
    fn = RLLoss(cfg, step_denominators(batches, 2 if cfg.runs_mtp else 0), occ)
    model.zero_grad_buffer()
    metrics = reduce_metrics(forward_backward(model, batches, fn, **fn.forward_kwargs()))
    if cfg.regime.runs_mtp:
        metrics.update(occ.reduce())  # OCC statistics, and λ for the next update
    grads = {n: p.main_grad.clone() for n, p in model.named_parameters()}
    return grads, metrics


def test_dynamic_micro_batches_give_the_gradients_of_fixed_ones(single_process):
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.train.optim import wrap_ddp
    from megatron_mtp_rl.train.schedule import configure
    from megatron_mtp_rl.train.step import build_micro_batches, compute_old_logprobs

    torch.manual_seed(0)
    model = wrap_ddp(build_model(get_preset("tiny-dense")))
    configure(model)
    samples = make_samples([(3, 4), (5, 12), (4, 3), (3, 17), (6, 5), (4, 9), (3, 6), (5, 2)])
    adv = torch.randn(len(samples), generator=torch.Generator().manual_seed(1)).tolist()
    fixed = build_micro_batches(samples, adv, 3, 24, False)
    natural = len(token_micro_batches(samples, adv, 24))
    dynamic = token_micro_batches(samples, adv, 24, count=len(samples) + 1)  # one sample each, one empty
    assert len(fixed) == 3 and natural == 4 and len(dynamic) == 9
    assert all(int((b.segment_ids > 0).sum()) <= 24 and b.shape[0] == 1 for b in dynamic)
    assert int((dynamic[-1].segment_ids > 0).sum()) == 0
    for batches in (fixed, dynamic):
        compute_old_logprobs(model, batches, with_mtp=True)
        perturb(batches)
    for name in CONFIGS:
        g_fixed, m_fixed = _run(model, fixed, name)
        g_dyn, m_dyn = _run(model, dynamic, name)
        assert sum(float(g.abs().sum()) for g in g_fixed.values()) > 0, name
        for n, g in g_fixed.items():
            torch.testing.assert_close(g_dyn[n], g, rtol=1e-4, atol=1e-7, msg=f"{name}: {n}")
        assert sorted(m_dyn) == sorted(m_fixed), name
        for k, v in m_fixed.items():
            assert m_dyn[k] == pytest.approx(v, rel=1e-4, abs=1e-7, nan_ok=True), (name, k)
        if name == "occ":
            assert m_fixed["occ/alignment_1"] != 0 and m_fixed["occ/lambda_1"] != 0.3  # informative: λ moved
        if name == "head_ce":
            assert m_fixed["mtp/head_loss_1"] > 0


def test_token_bins_fit_the_budget_and_an_overlong_sample_is_named():
    rng = random.Random(0)
    lengths = [rng.choice([3, 40, 700, 90, 1500, 8]) for _ in range(60)]
    bins = token_bins(lengths, 2048)
    assert sorted(i for b in bins for i in b) == list(range(60))  # every sample once
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    lower = max(-(-sum(lengths) // 2048), sum(n > 1024 for n in lengths))  # no bin holds two of > N/2
    assert len(bins) <= 11 / 9 * lower + 1  # first-fit decreasing's guarantee (vs. the optimum ≥ lower)
    assert [sorted(b) for b in token_bins([5, 5, 4, 3, 3], 10)] in ([[0, 1], [2, 3, 4]], [[2, 3, 4], [0, 1]])
    forced = token_bins(lengths, 2048, count=len(bins) + 3)
    assert len(forced) == len(bins) + 3 and sorted(i for b in forced for i in b) == list(range(60))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in forced)
    with pytest.raises(DataError, match=r"sample 2 of this step has 30 tokens.*--max-tokens-per-gpu 20"):
        token_bins([5, 20, 30], 20)


def test_balance_deals_every_sample_once_within_the_bound():
    # adversarial: a few huge answers among many tiny ones, sorted the worst way for a round-robin deal
    lengths = sorted([8192] * 3 + [4096] * 5 + [16] * 100 + [700] * 20, reverse=True)
    parts = balanced_parts(lengths, 4)
    sums = [sum(lengths[i] for i in p) for p in parts]
    mean = sum(lengths) / 4
    assert sorted(i for p in parts for i in p) == list(range(len(lengths)))
    assert max(sums) <= mean + max(lengths) and max(sums) / mean <= 1.05
    # global mini-batches dealt to 2 ranks: every sample of the step trained exactly once
    samples = make_samples([(4, n) for n in (900, 3, 5, 700, 8, 1, 2, 600, 4, 7, 3, 500)])
    order = list(range(len(samples)))
    random.Random(3).shuffle(order)
    ranks = [balanced_minibatches(samples, order, 6, 2, r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    seen = [i for r in ranks for mb in r for i in mb]
    assert sorted(seen) == list(range(12))
    for u in range(2):
        assert set(ranks[0][u]) | set(ranks[1][u]) == set(order[6 * u : 6 * u + 6])
        tok = [sum(sample_length(samples[i]) for i in ranks[r][u]) for r in (0, 1)]
        longest = max(sample_length(samples[i]) for i in order[6 * u : 6 * u + 6])
        assert max(tok) <= sum(tok) / 2 + longest and min(tok) > 0
