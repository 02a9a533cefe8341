"""Rollout–trainer mismatch metrics and truncated importance sampling against hand values."""

import math

import pytest
import torch

from megatron_mtp_rl.rl.loss import RLBatch, RLLoss, RLLossConfig, StepDenominators
from megatron_mtp_rl.rl.mismatch import mismatch_per_token, tis_weights
from megatron_mtp_rl.rl.policy_loss import Denominators


def test_tis_weights_hand_values():
    old = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.9)]])
    rollout = torch.tensor([[math.log(0.25), math.log(0.4), math.log(0.1)]])
    # ratios π_old/π_rollout: 2, 0.5, 9 → capped at 3
    w = tis_weights(old, rollout, cap=3.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 0.5, 3.0]]), rtol=1e-6, atol=1e-6)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="--tis-cap"):
        tis_weights(old, rollout, cap=0.0)


def test_mismatch_metrics_hand_values():
    old = torch.tensor([math.log(0.5), math.log(0.2)])
    rollout = torch.tensor([math.log(0.25), math.log(0.2)])
    m = mismatch_per_token(old, rollout)
    torch.testing.assert_close(m["rollout/logprob_abs_diff"], torch.tensor([math.log(2.0), 0.0], dtype=torch.float64))
    # k3 = r - 1 - log r with r = 2, 1
    torch.testing.assert_close(m["rollout/mismatch_kl"], torch.tensor([1.0 - math.log(2.0), 0.0], dtype=torch.float64))


def _batch(with_rollout: bool) -> RLBatch:
    b, s = 1, 4
    old = torch.log(torch.tensor([[0.5, 0.5, 0.2, 0.9]]))
    return RLBatch(
        tokens=torch.zeros(b, s, dtype=torch.long),
        labels=torch.zeros(b, s, dtype=torch.long),
        loss_mask=torch.tensor([[True, True, True, False]]),
        segment_ids=torch.ones(b, s, dtype=torch.long),
        position_ids=torch.arange(s)[None],
        advantages=torch.tensor([[1.0, -1.0, 2.0, 5.0]]),
        old_logprobs=old,
        rollout_logprobs=torch.log(torch.tensor([[0.25, 0.5, 0.4, 0.1]])) if with_rollout else None,
    )


def test_tis_weights_the_policy_loss():
    from megatron_mtp_rl.models.mtp_forward import HeadLogProbs

    den = StepDenominators(main=Denominators(tokens=3.0, sequences=1.0))
    batch = _batch(True)
    out = HeadLogProbs(logprobs=batch.old_logprobs.clone().requires_grad_(), loss_mask=batch.loss_mask)
    plain, m0 = RLLoss(RLLossConfig(mtp_regime="none"), den)(batch, out)
    tis, m1 = RLLoss(RLLossConfig(mtp_regime="none", tis_cap=1.5), den)(batch, out)
    # ratio = 1 at θ = θ_old: per-token loss −A; weights min(2, 1.5)=1.5, 1, 0.5 (masked 4th token)
    assert float(plain) == pytest.approx(-(1.0 - 1.0 + 2.0) / 3)
    assert float(tis) == pytest.approx(-(1.5 * 1.0 - 1.0 * 1.0 + 0.5 * 2.0) / 3)
    assert float(m1["train/tis_weight"][0] / m1["train/tis_weight"][1]) == pytest.approx(3.0 / 3)
    kl = float(m0["rollout/mismatch_kl"][0] / m0["rollout/mismatch_kl"][1])
    assert kl == pytest.approx(((2 - 1 - math.log(2)) + 0 + (0.5 - 1 - math.log(0.5))) / 3)
    with pytest.raises(ValueError, match="rollout engine's log-probs"):
        RLLoss(RLLossConfig(mtp_regime="none", tis_cap=1.5), den)(_batch(False), out)


def test_a_mismatch_that_measured_nothing_is_absent_not_zero():
    """No engine log-probs on any micro-batch: the mismatch means are left out of the step's row
    (a 0 would read as a perfect match); with them on one micro-batch, they are its mean."""
    from megatron_mtp_rl.models.mtp_forward import HeadLogProbs
    from megatron_mtp_rl.train.step import reduce_metrics

    den = StepDenominators(main=Denominators(tokens=3.0, sequences=1.0))
    loss = RLLoss(RLLossConfig(mtp_regime="none"), den)

    def metrics(batch):
        return loss(batch, HeadLogProbs(logprobs=batch.old_logprobs.clone(), loss_mask=batch.loss_mask))[1]

    without = reduce_metrics([metrics(_batch(False)), metrics(_batch(False))])
    assert "rollout/mismatch_kl" not in without and "rollout/logprob_abs_diff" not in without
    assert without["train/policy_loss"] == pytest.approx(2 * -(1.0 - 1.0 + 2.0) / 3)  # sums stay sums
    mixed = reduce_metrics([metrics(_batch(False)), metrics(_batch(True))])
    assert mixed["rollout/logprob_abs_diff"] == pytest.approx((math.log(2) + 0 + math.log(2)) / 3)


@pytest.mark.parametrize("cap", [None, 1.5])
def test_decoupled_loss_of_off_policy_steps_equals_a_hand_computation(cap):
    """--max-off-policy-steps 2: each token's clipped surrogate (clip around π_old) weighted by
    π_old/π_behaviour, truncated by --rollout-is-cap."""
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.models.mtp_forward import HeadLogProbs
    from megatron_mtp_rl.train.builders import build_loss

    flags = ["--max-off-policy-steps", "2", "--mtp-regime", "none"] + (["--rollout-is-cap", str(cap)] if cap else [])
    cfg = build_loss(parse_config(flags))
    assert cfg.tis_cap == (cap or math.inf)
    assert build_loss(parse_config(["--max-off-policy-steps", "1", "--mtp-regime", "none"])).tis_cap is None
    den = StepDenominators(main=Denominators(tokens=3.0, sequences=1.0))
    batch = _batch(True)
    out = HeadLogProbs(logprobs=torch.log(torch.tensor([[0.6, 0.3, 0.3, 0.5]])), loss_mask=batch.loss_mask)
    loss, _ = RLLoss(cfg, den)(batch, out)
    # r = π/π_old = 1.2, 0.6, 1.5; A = 1, −1, 2; ε = 0.2: min(rA, clip(r)A) = 1.2, −0.8, 2.4
    # w = π_old/π_behaviour = 2, 1, 0.5 (2 → 1.5 with the cap)
    w0 = cap or 2.0
    assert float(loss) == pytest.approx(-(w0 * 1.2 + 1.0 * -0.8 + 0.5 * 2.4) / 3, rel=1e-5)
