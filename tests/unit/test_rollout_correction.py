"""Rollout corrections (IS / rejection / veto at token, sequence, geometric level) against hand values."""

import math

import pytest
import torch

from megatron_mtp_rl.models.mtp_forward import HeadLogProbs
from megatron_mtp_rl.rl.loss import RLBatch, RLLoss, RLLossConfig, StepDenominators
from megatron_mtp_rl.rl.policy_loss import Denominators, sequence_index
from megatron_mtp_rl.rl.rollout_correction import RolloutCorrection, rollout_correction
from megatron_mtp_rl.train.step import reduce_metrics

# One packed row, two sequences (segments 1, 2) and a padding token; per-token ratios r = π_old/π_rollout.
R = [2.0, 0.5, 4.0, 0.25, 1.0, 9.0]  # seq 1: 2, 0.5, 4; seq 2: 0.25, 1; last token is padding (masked)
SEG = torch.tensor([[1, 1, 1, 2, 2, 0]])
MASK = torch.tensor([[True, True, True, True, True, False]])
OLD = torch.log(torch.tensor([[0.8, 0.1, 0.4, 0.05, 0.3, 0.9]]))
ROLLOUT = OLD - torch.log(torch.tensor([R]))


def _run(cfg):
    return rollout_correction(cfg, OLD, ROLLOUT, MASK, sequence_index(SEG))


def _mean(v):
    return float(v[0] / v[1])


@pytest.mark.parametrize(
    "level,expected",
    [
        ("token", [2.0, 0.5, 3.0, 0.25, 1.0]),  # min(r, 3)
        ("sequence", [3.0, 3.0, 3.0, 0.25, 0.25]),  # ∏: 4 → 3; 0.25
        ("geometric", [2.0, 2.0, 2.0, 0.5, 0.5]),  # (2·0.5·4)^(1/3) = 4^(1/3) ≈ 1.587 … see below
    ],
)
def test_importance_weights_per_level(level, expected):
    if level == "geometric":
        expected = [4 ** (1 / 3)] * 3 + [0.5, 0.5]
    out = _run(RolloutCorrection(is_level=level, is_cap=3.0))
    torch.testing.assert_close(out.weights[0, :5], torch.tensor(expected), rtol=1e-5, atol=1e-6)
    assert out.keep.tolist() == MASK.tolist()
    assert _mean(out.metrics["rollout_correction/is_weight_mean"]) == pytest.approx(sum(expected) / 5, rel=1e-5)
    assert float(out.metrics["rollout_correction/is_weight_max"][0]) == pytest.approx(max(expected), rel=1e-5)


@pytest.mark.parametrize(
    "level,kept",
    [
        ("token", [True, True, False, False, True]),  # r in [0.4, 3]: 2, 0.5, 1 stay
        ("sequence", [False, False, False, False, False]),  # ∏ 4 and 0.25: both out
        ("geometric", [True, True, True, True, True]),  # 1.587 and 0.5: both in
    ],
)
def test_rejection_per_level(level, kept):
    out = _run(RolloutCorrection(rs_level=level, rs_bounds=(0.4, 3.0)))
    assert out.keep[0, :5].tolist() == kept and not out.keep[0, 5]
    assert torch.all(out.weights == 1)
    assert _mean(out.metrics["rollout_correction/rs_masked_fraction"]) == pytest.approx(kept.count(False) / 5)


def test_veto_drops_the_whole_sequence_of_a_catastrophic_token():
    out = _run(RolloutCorrection(veto_threshold=0.3))  # token 4 (r = 0.25) vetoes sequence 2
    assert out.keep[0].tolist() == [True, True, True, False, False, False]
    assert _mean(out.metrics["rollout_correction/veto_fraction"]) == pytest.approx(2 / 5)


def test_flags_are_checked():
    for bad in (
        dict(is_level="token"),
        dict(is_level="token", is_cap=0.0),
        dict(rs_level="token"),
        dict(rs_level="token", rs_bounds=(2.0, 1.0)),
        dict(veto_threshold=0.0),
    ):
        with pytest.raises(ValueError):
            RolloutCorrection(**bad)


def _batch():
    return RLBatch(
        tokens=torch.zeros_like(SEG),
        labels=torch.zeros_like(SEG),
        loss_mask=MASK,
        segment_ids=SEG,
        position_ids=torch.arange(6)[None],
        advantages=torch.tensor([[1.0, -1.0, 2.0, 0.5, -2.0, 7.0]]),
        old_logprobs=OLD,
        rollout_logprobs=ROLLOUT,
    )


def _loss(cfg: RLLossConfig):
    den = StepDenominators(main=Denominators(tokens=5.0, sequences=2.0))
    batch = _batch()
    out = HeadLogProbs(logprobs=batch.old_logprobs.clone().requires_grad_(), loss_mask=batch.loss_mask)
    loss, metrics = RLLoss(cfg, den)(batch, out)
    loss.backward()
    return loss, out.logprobs.grad, reduce_metrics([metrics])


def test_tis_cap_is_token_level_is_with_that_cap():
    a_loss, a_grad, a_m = _loss(RLLossConfig(mtp_regime="none", tis_cap=1.5))
    b_loss, b_grad, b_m = _loss(RLLossConfig(mtp_regime="none", correction=RolloutCorrection.from_flags("token", 1.5)))
    assert float(a_loss) == float(b_loss)
    assert torch.equal(a_grad, b_grad)
    # at θ = θ_old the ratio is 1: per-token loss −A·min(r, 1.5), token-mean over 5
    assert float(a_loss) == pytest.approx(-(1.5 * 1 - 0.5 * 1 + 1.5 * 2 + 0.25 * 0.5 - 1.0 * 2) / 5, rel=1e-5)
    assert a_m["rollout_correction/is_weight_max"] == b_m["rollout_correction/is_weight_max"] == pytest.approx(1.5)
    with pytest.raises(ValueError, match="give one or the other"):
        RLLossConfig(tis_cap=1.5, correction=RolloutCorrection.from_flags("sequence", 1.5))


def test_rejected_tokens_carry_no_policy_loss():
    loss, grad, m = _loss(
        RLLossConfig(mtp_regime="none", correction=RolloutCorrection.from_flags(rollout_veto_threshold=0.3))
    )
    assert float(loss) == pytest.approx(-(1 - 1 + 2) / 5)  # sequence 2 vetoed, denominator unchanged
    assert torch.all(grad[0, 3:] == 0) and torch.all(grad[0, :3] != 0)
    assert m["rollout_correction/veto_fraction"] == pytest.approx(0.4)


def test_maximum_reduces_by_max_and_is_absent_when_nothing_counted():
    from megatron_mtp_rl.rl.metric_values import maximum

    assert reduce_metrics([{"x_max": maximum(2.0)}, {"x_max": maximum(5.0)}, {"x_max": maximum(None)}]) == {
        "x_max": 5.0
    }
    assert reduce_metrics([{"x_max": maximum(None)}]) == {}
    assert math.isfinite(reduce_metrics([{"x_max": maximum(-1.0)}])["x_max"])


def test_config_checks_and_builds_the_correction():
    from megatron_mtp_rl import config as C
    from megatron_mtp_rl.train.builders import build_loss

    def problems(*argv):
        return [p for p in C.validate(C.parse_config(list(argv)), 1) if "rollout" in p or "tis" in p or "routing" in p]

    assert any("--rollout-is-cap" in p for p in problems("--rollout-is", "sequence"))
    assert any("LOW,HIGH" in p for p in problems("--rollout-rs", "token", "--rollout-rs-bounds", "x"))
    assert any("give one or the other" in p for p in problems("--tis-cap", "2", "--rollout-is", "geometric"))
    assert any("choose one" in p for p in problems("--use-rollout-routing-replay", "--use-routing-replay"))
    assert any("needs an MoE model" in p for p in problems("--use-routing-replay", "--preset", "tiny-dense"))
    assert any(
        "--local-spec-decode" in p
        for p in problems("--use-rollout-routing-replay", "--local-spec-decode", "--preset", "tiny-moe")
    )
    cfg = C.parse_config(["--rollout-rs", "geometric", "--rollout-rs-bounds", "0.5,2", "--tis-cap", "3"])
    assert problems("--rollout-rs", "geometric", "--rollout-rs-bounds", "0.5,2", "--tis-cap", "3") == []
    corr = build_loss(cfg).correction
    assert (corr.is_level, corr.is_cap, corr.rs_level, corr.rs_bounds) == ("token", 3.0, "geometric", (0.5, 2.0))
