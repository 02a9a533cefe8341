"""Advantages and policy losses against hand computations."""

import math

import pytest
import torch

from megatron_mtp_rl.rl.advantages import dynamic_sampling_mask, grpo_advantages, overlong_penalty
from megatron_mtp_rl.rl.policy_loss import (
    Denominators,
    aggregate,
    clipped_surrogate,
    kl_penalty,
    log_ratio,
    sequence_index,
)


def test_grpo_normalisation():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(r, 3)
    # group 1: mean 1/3, sample std sqrt(1/3)
    std = math.sqrt(((2 / 3) ** 2 + 2 * (1 / 3) ** 2) / 2)
    assert adv[:3].tolist() == pytest.approx([(2 / 3) / std, -(1 / 3) / std, -(1 / 3) / std], rel=1e-5)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]
    assert grpo_advantages(r, 3, normalize_std=False)[:3].tolist() == pytest.approx([2 / 3, -1 / 3, -1 / 3])
    with pytest.raises(ValueError, match="multiple of the group size"):
        grpo_advantages(torch.ones(5), 3)


def test_dynamic_sampling_and_overlong():
    keep = dynamic_sampling_mask(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0]), 2)
    assert keep.tolist() == [True, True, False, False, False, False]
    pen = overlong_penalty(torch.tensor([10, 16, 18, 20, 25]), max_len=20, buffer_len=4)
    assert pen.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def test_clip_higher_and_dual_clip():
    lr = torch.log(torch.tensor([0.5, 1.5, 1.5, 0.5, 4.0]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, -1.0])
    out = clipped_surrogate(lr, adv, eps_clip=0.2, eps_clip_high=0.28)
    # A>0: -min(rA, clip(r)A): r=.5 → -0.5 (unclipped smaller), r=1.5 → -1.28 (clip-higher)
    # A<0: r=1.5 → max(1.5, 1.28) = 1.5; r=.5 → max(.5, .8) = .8 (clipped)
    assert out.loss[:4].tolist() == pytest.approx([-0.5, -1.28, 1.5, 0.8])
    assert out.clipped[:4].tolist() == [False, True, False, True]
    dual = clipped_surrogate(lr, adv, eps_clip=0.2, eps_clip_c=3.0)
    assert dual.loss[4].item() == pytest.approx(3.0)  # r·|A| = 4 bounded by c·|A| = 3
    assert dual.loss[2].item() == pytest.approx(1.5)  # below the bound: unchanged
    with pytest.raises(ValueError, match="must be > 1"):
        clipped_surrogate(lr, adv, eps_clip=0.2, eps_clip_c=0.5)


def test_gspo_sequence_ratio_is_length_normalised_with_token_gradients():
    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    seq = sequence_index(seg)
    mask = torch.tensor([[True, True, False, True, True, False]])
    logp = torch.tensor([[-1.0, -2.0, -9.0, -1.0, -1.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.5, 0.0, -2.0, -1.0, 0.0]])
    lr = log_ratio(logp, old, mask, seq, "sequence")
    # seq 1: mean of (0.5, -0.5) = 0 ; seq 2: mean of (1, 0) = 0.5
    assert lr[0, [0, 1]].tolist() == pytest.approx([0.0, 0.0])
    assert lr[0, [3, 4]].tolist() == pytest.approx([0.5, 0.5])
    lr[0, 0].backward()
    assert logp.grad[0].tolist() == [1.0, 0, 0, 0, 0, 0]  # each token keeps its own gradient


def test_aggregation_modes():
    seg = torch.tensor([[1, 1, 1, 2, 2], [1, 1, 0, 0, 0]])
    seq = sequence_index(seg)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]], dtype=torch.bool)
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0, 100.0], [5.0, 7.0, 100.0, 100.0, 100.0]])
    den = Denominators(tokens=6, sequences=3)
    assert aggregate(loss, mask, seq, "token-mean", den).item() == pytest.approx(22 / 6)
    assert aggregate(loss, mask, seq, "seq-mean-token-sum", den).item() == pytest.approx((6 + 4 + 12) / 3)
    assert aggregate(loss, mask, seq, "seq-mean-token-mean", den).item() == pytest.approx((2 + 4 + 6) / 3)
    # Global denominators: two halves sum to the whole.
    big = Denominators(tokens=12, sequences=6)
    half = aggregate(loss, mask, seq, "seq-mean-token-mean", big).item()
    assert 2 * half == pytest.approx((2 + 4 + 6) / 3)
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(loss, mask, seq, "sum", den)


def test_kl_estimators():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.5, -1.0])
    assert kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, -1.0])
    k3 = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx(k3)
    far = kl_penalty(torch.tensor([-30.0]), torch.tensor([0.0]), "low-var-kl")
    assert far.item() == 10.0
