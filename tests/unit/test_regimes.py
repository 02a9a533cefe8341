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


def _grads(model, batches, regime, coef=None, entropy_coef=0.0, head="none"):
    from megatron_mtp_rl.train.schedule import forward_backward

    cfg = RLLossConfig(
        mtp_regime=regime, mtp_loss_coef=0.5, entropy_coef=entropy_coef, mtp_head_loss=head, mtp_head_coef=0.5
    )
    den = step_denominators(batches, 2 if cfg.runs_mtp else 0)
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


@pytest.mark.parametrize(("regime", "head"), [("none", "distill"), ("occ", "ce"), ("policy", "distill")])
def test_head_loss_trains_only_the_mtp_layers(setup, regime, head):
    """The head objective changes MTP gradients and leaves the trunk's bit-identical."""
    model, batches = setup
    base_trunk, base_mtp = _split(_grads(model, batches, regime))
    trunk, mtp = _split(_grads(model, batches, regime, head=head))
    for n, g in base_trunk.items():
        assert torch.equal(trunk[n], g), n
    assert all(g.abs().sum() > 0 for g in mtp.values())
    assert all(not torch.equal(mtp[n], g) for n, g in base_mtp.items() if "layers.0" in n or "eh_proj" in n)


def test_head_loss_metrics_and_value(setup):
    """``mtp/head_loss_k`` of ce is the detached pass's mean −log q (the regime's own CE value)."""
    from megatron_mtp_rl.train.schedule import forward_backward

    model, batches = setup
    out = {}
    for regime, head in (("ce", "none"), ("occ", "ce"), ("none", "distill")):
        cfg = RLLossConfig(mtp_regime=regime, mtp_loss_coef=0.5, mtp_head_loss=head)
        fn = RLLoss(cfg, step_denominators(batches, 2), OCCEstimator(2))
        model.zero_grad_buffer()
        per_mb = forward_backward(model, batches, fn, **fn.forward_kwargs())
        out[(regime, head)] = {k: sum(float(m[k][0]) for m in per_mb) for k in per_mb[0]}
    ce, occ_ce, dist = out[("ce", "none")], out[("occ", "ce")], out[("none", "distill")]
    for d in (1, 2):
        assert occ_ce[f"mtp/head_loss_{d}"] == pytest.approx(ce[f"mtp/loss_{d}"], rel=1e-6)
        assert dist[f"mtp/head_loss_{d}"] > 0  # KL(p_main ‖ q_k) of an untrained draft
        assert f"mtp/accept_{d}" in dist and f"mtp/loss_{d}" not in dist


def _train(regime, head, steps=3):
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.train.optim import build_optimizer, clip_grads, wrap_ddp
    from megatron_mtp_rl.train.schedule import configure, forward_backward

    torch.manual_seed(0)
    model = wrap_ddp(build_model(get_preset("tiny-dense")))
    configure(model)
    opt = build_optimizer(model, lr=1e-2)
    seqs = sequences(4, seed=9)
    b, _ = pack_sequences(seqs, 24)
    adv = torch.randn(b.tokens.shape, generator=torch.Generator().manual_seed(1)) * b.loss_mask
    batches = [RLBatch(**b.__dict__, advantages=adv)]
    cfg = RLLossConfig(mtp_regime=regime, mtp_loss_coef=0.3, mtp_head_loss=head, mtp_head_coef=0.3)
    for _ in range(steps):
        compute_old_logprobs(model, batches, with_mtp=cfg.regime.needs_old_mtp_logprobs)
        fn = RLLoss(cfg, step_denominators(batches, 2 if cfg.runs_mtp else 0), None)
        model.zero_grad_buffer()
        opt.zero_grad()
        forward_backward(model, batches, fn, **fn.forward_kwargs())
        clip_grads(model, 1.0, 1.0)
        assert opt.step()[0]
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_detach_equals_none_plus_head_ce(single_process):
    det = _train("detach", "none")
    head = _train("none", "ce")
    init = _train("none", "none", steps=0)
    for n, p in det.items():
        assert torch.equal(head[n], p), n
    assert any(not torch.equal(p, init[n]) for n, p in det.items() if n.startswith("module.mtp."))
