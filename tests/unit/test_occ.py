"""OCC numerics against hand-computed values."""

import math

import pytest
import torch

from megatron_mtp_rl.rl.occ import (
    OCCConfig,
    OCCEstimator,
    occ_coefficient,
    occ_statistics,
    zero_alignment_warning,
)


def test_statistics_exclude_masked_tokens_and_use_the_baseline():
    main = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, float("nan"), -1.0]])
    old = torch.tensor([[-1.5, -2.0, -2.0], [-1.0, 0.0, -1.5]])
    mtp = torch.tensor([[-2.0, -1.0, -4.0], [-2.0, float("inf"), -3.5]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    s = occ_statistics(main, old, mtp, mask)
    # valid tokens: (0,0) d=.5 e=-.5; (0,1) d=0 e=1; (1,0) d=.5 e=-1; (1,2) d=.5 e=-2
    assert s.tolist() == pytest.approx([0.5 * -0.5 + 0 + 0.5 * -1 + 0.5 * -2, 0.25 + 1 + 1 + 4, 4, 3])
    base = torch.full_like(old, -1.0)
    s2 = occ_statistics(main, old, mtp, mask.bool(), baseline=base)
    # e = mtp - (-1): -1, 0, -1, -2.5
    assert s2.tolist() == pytest.approx([0.5 * -1 + 0 + 0.5 * -1 + 0.5 * -2.5, 1 + 0 + 1 + 6.25, 4, 3])


def test_coefficient_is_a_ratio_of_sums_not_a_mean_of_ratios():
    # Two tokens: (d, e) = (1, 1) and (1, 3). Ratio of sums: A = (1+3)/2 = 2, V = (1+9)/2 = 5.
    stats = torch.tensor([4.0, 10.0, 2.0], dtype=torch.float64)
    lam = occ_coefficient(stats, ratio=0.5, num_depths=2, eps=0.0, lo=-10, hi=10)
    assert lam == pytest.approx(0.25 * 2 / 5)
    mean_of_ratios = 0.25 * (1 / 1 + 3 / 9) / 2
    assert abs(lam - mean_of_ratios) > 1e-3


def test_coefficient_clamps_and_rejects_empty_or_nonfinite():
    assert occ_coefficient(torch.tensor([-5.0, 1.0, 1.0]), ratio=1, num_depths=1) == 0.0
    assert occ_coefficient(torch.tensor([50.0, 1.0, 1.0]), ratio=1, num_depths=1) == 1.0
    assert occ_coefficient(torch.tensor([0.3, 1.0, 1.0]), ratio=1, num_depths=1, eps=0) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no valid token"):
        occ_coefficient(torch.tensor([0.0, 0.0, 0.0]), ratio=1, num_depths=1)
    with pytest.raises(ValueError, match="non-finite"):
        occ_coefficient(torch.tensor([float("nan"), 1.0, 1.0]), ratio=1, num_depths=1)


def test_estimator_init_lag_ema_and_guard():
    est = OCCEstimator(2, OCCConfig(ratio=0.2, ema=0.5, eps=0.0))
    assert est.lambdas == [0.1, 0.1]  # --occ-init defaults to ρ/D
    # Step 1: depth 1 has A=0.4, V=1 → λ* = 0.1·0.4 = 0.04; depth 2 has no token → guard.
    est.accumulate(torch.tensor([[0.2, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    est.accumulate(torch.tensor([[0.2, 0.5, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64))
    # The lagged λ is still the initial one while the step runs.
    assert est.coefficients_for(None) == [0.1, 0.1]
    m = est.reduce()
    assert est.lambdas[0] == pytest.approx(0.5 * 0.1 + 0.5 * 0.04)
    assert est.lambdas[1] == pytest.approx(0.1)  # kept: EMA of the previous value with itself
    assert m["occ/guard_events"] == 1 and math.isnan(m["occ/alignment_2"])
    assert m["occ/skipped_updates"] == 1
    assert m["occ/alignment_1"] == pytest.approx(0.4) and m["occ/variance_1"] == pytest.approx(1.0)
    # Non-finite statistics keep the previous λ too.
    est.accumulate(torch.tensor([[float("nan"), 1.0, 1.0, 1.0], [0.1, 1.0, 1.0, 1.0]], dtype=torch.float64))
    prev = est.lambdas[0]
    est.reduce()
    assert est.lambdas[0] == prev and est.guard_events == 2
    # Statistics are reset after every reduce.
    assert est._stats.abs().sum() == 0


def test_explicit_init_and_local_mode_uses_the_microbatch_itself():
    est = OCCEstimator(1, OCCConfig(ratio=1.0, init=0.7, reduce="local", eps=0.0))
    assert est.lambdas == [0.7]
    assert est.coefficients_for(torch.zeros(1, 4, dtype=torch.float64)) == [0.7]  # no token: init kept
    stats = torch.tensor([[0.3, 1.0, 1.0, 1.0]], dtype=torch.float64)
    assert est.coefficients_for(stats) == [pytest.approx(0.3)]
    # An uninformative micro-batch (θ = θ_old: every d is 0) uses the last λ, not 0.
    assert est.coefficients_for(torch.tensor([[0.0, 1.0, 1.0, 0.0]], dtype=torch.float64)) == [pytest.approx(0.3)]
    assert est.skipped_updates == 2
    # Local mode never communicates and reduce() does not move λ.
    est.accumulate(torch.tensor([[0.9, 1.0, 1.0, 1.0]], dtype=torch.float64))
    assert est.reduce()["occ/lambda_1"] == pytest.approx(0.3) and est.reduce_calls == 0


def test_theta_equal_theta_old_minibatch_keeps_lambda():
    """d ≡ 0 (first mini-batch of a rollout batch) is not a measurement of zero alignment."""
    est = OCCEstimator(2, OCCConfig(ratio=1.0, eps=0.0, lo=-1, hi=1))
    main = torch.tensor([[-1.0, -2.0, -0.5]])
    mtp = torch.tensor([[-1.5, -1.0, -2.5]])
    mask = torch.tensor([[1, 1, 1]])
    # Step 1: θ moved → informative.
    old = main - torch.tensor([[0.1, -0.2, 0.3]])
    s = occ_statistics(main, old, mtp, mask)
    est.accumulate(torch.stack([s, s]))
    est.reduce()
    lam = list(est.lambdas)
    assert lam[0] != 0.5 and lam[0] == lam[1]
    # Step 2: θ = θ_old: every valid d is exactly 0 (masked positions may differ).
    old2 = main.clone()
    old2[0, 2] -= 1.0
    s0 = occ_statistics(main, old2, mtp, torch.tensor([[1, 1, 0]]))
    assert s0[0] == 0 and s0[3] == 0 and s0[1] > 0
    est.accumulate(torch.stack([s0, s0]))
    m = est.reduce()
    assert est.lambdas == lam and m["occ/lambda_1"] == lam[0]
    assert m["occ/skipped_updates"] == 2 and m["occ/guard_events"] == 0 and m["occ/alignment_1"] == 0.0
    # S_V = 0 (MTP log-prob equals the baseline) is uninformative too.
    est.accumulate(torch.tensor([[0.0, 0.0, 3.0, 3.0], [0.0, 0.0, 3.0, 3.0]], dtype=torch.float64))
    est.reduce()
    assert est.lambdas == lam and est.skipped_updates == 4
    with pytest.raises(ValueError, match="exactly 0"):
        occ_coefficient(s0, ratio=1, num_depths=1)


def test_config_validation_and_state_round_trip():
    with pytest.raises(ValueError, match="--occ-baseline"):
        OCCConfig(baseline="nope")
    with pytest.raises(ValueError, match="--occ-reduce"):
        OCCConfig(reduce="allgather")
    with pytest.raises(ValueError, match="--mtp-num-layers"):
        OCCEstimator(0)
    a = OCCEstimator(2)
    a.lambdas = [0.3, 0.4]
    a.skipped_updates = 5
    b = OCCEstimator(2)
    b.load_state_dict(a.state_dict())
    assert b.lambdas == [0.3, 0.4] and b.skipped_updates == 5
    with pytest.raises(ValueError, match="2 MTP depths"):
        OCCEstimator(3).load_state_dict(a.state_dict())


def test_zero_alignment_warning():
    msg = zero_alignment_warning(regime="occ", reduce="global", minibatches_per_rollout=1)
    assert msg and "identically 0" in msg and "stays at --occ-init" in msg
    assert zero_alignment_warning(regime="occ", reduce="global", minibatches_per_rollout=2) is None
    assert zero_alignment_warning(regime="policy", reduce="global", minibatches_per_rollout=1) is None
