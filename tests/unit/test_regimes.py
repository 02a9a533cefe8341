"""Gradient routing of the five MTP regimes on a tiny model, one step, fixed data."""

import pytest
import torch

from megatron_mtp_rl.models import pack_sequences
from megatron_mtp_rl.rl import OCCConfig, OCCEstimator, RLBatch, RLLoss, RLLossConfig
from megatron_mtp_rl.rl.loss import step_denominators
from megatron_mtp_rl.train.step import compute_old_logprobs
from tests.distributed.workers import sequences


@pytest.fixture(scope="module")
def setup(single_process):
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.train.optim import wrap_ddp
    from megatron_mtp_rl.train.schedule import configure

    torch.manual_seed(0)
    model = wrap_ddp(build_model(get_preset("tiny-dense")))
    configure(model)
    seqs = sequences(6, seed=4)
    batches = []
    for i in range(0, 6, 3):
        b, _ = pack_sequences(seqs[i : i + 3], 24)
        adv = torch.randn(b.tokens.shape, generator=torch.Generator().manual_seed(i)) * b.loss_mask
        batches.append(RLBatch(**b.__dict__, advantages=adv))
    compute_old_logprobs(model, batches, with_mtp=True)
    for b in batches:  # pretend θ moved since the rollout: d = ℓ − ℓ_old ≠ 0
        b.old_logprobs = b.old_logprobs + 0.05 * torch.randn_like(b.old_logprobs)
    return model, batches


def _grads(model, batches, regime, coef=None, entropy_coef=0.0):
    from megatron_mtp_rl.train.schedule import forward_backward

    cfg = RLLossConfig(mtp_regime=regime, mtp_loss_coef=0.5, entropy_coef=entropy_coef)
    den = step_denominators(batches, 2 if cfg.regime.runs_mtp else 0)
    occ = OCCEstimator(2, OCCConfig(init=0.3))
    fn = RLLoss(cfg, den, occ, mtp_coef_override=coef)
    model.zero_grad_buffer()
    forward_backward(model, batches, fn, **fn.forward_kwargs())
    return {n.removeprefix("module."): p.main_grad.clone() for n, p in model.named_parameters()}


def _split(grads):
    trunk = {n: g for n, g in grads.items() if not n.startswith("mtp.")}
    mtp = {n: g for n, g in grads.items() if n.startswith("mtp.")}
    return trunk, mtp


def test_detach_leaves_the_trunk_exactly_as_none(setup):
    model, batches = setup
    none_trunk, none_mtp = _split(_grads(model, batches, "none"))
    det_trunk, det_mtp = _split(_grads(model, batches, "detach"))
    for n, g in none_trunk.items():
        assert torch.equal(det_trunk[n], g), n
    assert all(g.abs().sum() == 0 for g in none_mtp.values())
    assert all(g.abs().sum() > 0 for g in det_mtp.values())


@pytest.mark.parametrize("regime", ["ce", "policy", "occ"])
def test_joint_regimes_change_the_trunk(setup, regime):
    model, batches = setup
    none_trunk, _ = _split(_grads(model, batches, "none"))
    trunk, mtp = _split(_grads(model, batches, regime))
    differs = [n for n, g in none_trunk.items() if not torch.allclose(trunk[n], g, atol=1e-7)]
    assert "embedding.word_embeddings.weight" in differs
    assert any(n.startswith("decoder.layers.") for n in differs)
    assert all(g.abs().sum() > 0 for g in mtp.values())


def test_occ_with_lambda_zero_equals_none_for_the_trunk(setup):
    model, batches = setup
    none_trunk, _ = _split(_grads(model, batches, "none"))
    occ_trunk, _ = _split(_grads(model, batches, "occ", coef=[0.0, 0.0]))
    for n, g in none_trunk.items():
        assert torch.equal(occ_trunk[n], g), n


def test_entropy_bonus_keeps_the_mtp_term(setup):
    model, batches = setup
    _, mtp = _split(_grads(model, batches, "occ", entropy_coef=0.01))
    assert all(g.abs().sum() > 0 for g in mtp.values())
    base_trunk, _ = _split(_grads(model, batches, "occ"))
    ent_trunk, _ = _split(_grads(model, batches, "occ", entropy_coef=0.01))
    assert not torch.equal(base_trunk["decoder.final_layernorm.weight"], ent_trunk["decoder.final_layernorm.weight"])
