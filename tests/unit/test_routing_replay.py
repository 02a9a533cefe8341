"""MoE routing replay (R3, R2) through megatron's RouterReplay, with a bf16 engine and an fp32 trainer."""

import pytest
import torch

from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.models.routing_replay import token_layout, trunk_routers
from megatron_mtp_rl.rollout.manager import Sample
from megatron_mtp_rl.train.microbatches import build_micro_batches, token_micro_batches
from megatron_mtp_rl.train.schedule import forward_backward

PROMPTS = [[5, 9, 2], [7, 1, 4, 4, 8, 3], [11], [3, 3, 6, 1]] * 3


@pytest.fixture(scope="module")
def moe(single_process):
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.provider import RuntimeOptions

    torch.manual_seed(0)
    # a larger init spreads the router logits: more tokens near a tie for bf16 to flip
    return build_model(
        get_preset("tiny-moe").with_overrides(init_method_std=0.3), runtime=RuntimeOptions(routing_replay=True)
    )


@pytest.fixture(scope="module")
def samples(moe):
    from megatron_mtp_rl.rollout.local_engine import LocalEngine

    engine = LocalEngine(moe, vocab_size=moe.real_vocab_size, dtype="bfloat16", record_routes=True)
    completions, _ = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10), seed=3)
    return [
        Sample(None, p, c.response_ids, c.logprobs, "", c.finished, routes=c.routes)
        for p, c in zip(PROMPTS, completions)
    ]


def _routing_maps(model):
    """Forward hooks keeping each trunk router's routing_map [tokens, experts] by MoE-layer index."""
    seen, handles = {}, []
    for layer in model.decoder.layers:
        router = layer.mlp.router
        idx = trunk_routers(model)[[rr for _, rr in trunk_routers(model)].index(router.router_replay)][0]
        handles.append(router.register_forward_hook(lambda m, i, o, idx=idx: seen.setdefault(idx, []).append(o[1])))
    return seen, handles


def _old_pass(model, mbs, **mode):
    from megatron_mtp_rl.train.step import compute_old_logprobs

    model.route_replay.configure(**mode)
    compute_old_logprobs(model, mbs, with_mtp=False)
    model.route_replay.configure()


def _kl(mbs):
    num = den = 0.0
    for b in mbs:
        m = b.loss_mask
        r = (b.old_logprobs - b.rollout_logprobs).double()[m]
        num += float((torch.expm1(r) - r).sum())
        den += float(m.sum())
    return num / den


def test_samples_carry_compact_routes(samples):
    for s in samples:
        assert s.routes.dtype == torch.uint8
        assert s.routes.shape == (len(s.prompt_ids) + len(s.response_ids) - 1, 2, 2)
        assert int(s.routes.max()) < 4


def test_r3_replays_the_engine_routes_exactly_and_shrinks_the_mismatch(moe, samples):
    adv = [1.0] * len(samples)
    mbs = build_micro_batches(samples, adv, 4, 64, False)
    assert all(b.routes is not None and b.routes.dtype == torch.int16 for b in mbs)
    _old_pass(moe, mbs, observe=True)  # live routing: the trainer's own experts
    live_kl = _kl(mbs)
    agree, total = moe.route_replay.take_agreement()
    assert total == sum(len(s.routes) for s in samples) * 2
    assert 0.5 < agree / total < 1.0  # the bf16 engine chose other experts for some (token, layer)

    seen, handles = _routing_maps(moe)
    try:
        _old_pass(moe, mbs, source="routes")
    finally:
        for h in handles:
            h.remove()
    replay_kl = _kl(mbs)
    for idx, maps in seen.items():
        for b, routing_map in zip(mbs, maps):
            want = token_layout(b.routes, moe)[:, idx].long()
            known = (want >= 0).all(-1)
            expect = torch.zeros_like(routing_map).scatter_(1, want.clamp(min=0), True)
            assert torch.equal(routing_map[known], expect[known])  # every packed token, exactly
    assert replay_kl < live_kl


def test_dynamic_batches_carry_the_routes(samples):
    mbs = token_micro_batches(samples, [0.0] * len(samples), 48, count=5)
    got = sorted(int((b.routes >= 0).all(-1).all(-1).sum()) for b in mbs if b.routes is not None)
    assert sum(got) == sum(len(s.routes) for s in samples)
    assert any(b.routes is None for b in mbs) or len(mbs) == 5


def test_r2_update_pass_replays_the_old_pass_routes_and_the_router_learns(moe, samples):
    from megatron_mtp_rl.rl.loss import RLLoss, RLLossConfig, step_denominators

    mbs = build_micro_batches(samples, [1.0, -1.0] * (len(samples) // 2), 4, 64, False)
    _old_pass(moe, mbs, record_to="r2_routes")
    assert all(b.r2_routes is not None for b in mbs)
    assert all(torch.equal(b.r2_routes >= 0, b.tokens[..., None, None].expand_as(b.r2_routes) >= 0) for b in mbs)
    routers = [layer.mlp.router.weight for layer in moe.decoder.layers]
    saved = [w.detach().clone() for w in routers]  # the module's model is shared: put the routers back after
    with torch.no_grad():  # move the weights a little: live routing would now differ from the old pass
        for w in routers:
            w.add_(torch.randn_like(w) * 0.5)
    moe.route_replay.configure(source="r2_routes")
    seen, handles = _routing_maps(moe)
    moe.zero_grad(set_to_none=True)
    try:
        cfg = RLLossConfig(mtp_regime="none")
        forward_backward(moe, mbs, RLLoss(cfg, step_denominators(mbs, 0)), with_mtp=False)
    finally:
        for h in handles:
            h.remove()
        moe.route_replay.configure()
        with torch.no_grad():
            for w, s in zip(routers, saved):
                w.copy_(s)
    for idx, maps in seen.items():
        for b, routing_map in zip(mbs, maps):
            want = token_layout(b.r2_routes, moe)[:, idx].long()
            expect = torch.zeros_like(routing_map).scatter_(1, want, True)
            assert torch.equal(routing_map, expect)
    for layer in moe.decoder.layers:
        g = layer.mlp.router.weight.grad
        assert g is not None and float(g.abs().sum()) > 0


@pytest.mark.parametrize("thd", [False, True])
def test_token_layout_follows_the_decoder_and_inverts(monkeypatch, thd):
    """sbhd: [S, B] flattened; THD: one [B·S] row; sequence parallel: this TP rank's slice of it."""
    from types import SimpleNamespace

    from megatron.core import parallel_state

    from megatron_mtp_rl.models import routing_replay as rr

    routes = torch.arange(2 * 4 * 3 * 2, dtype=torch.int16).reshape(2, 4, 3, 2)  # [B, S, L, K]
    model = SimpleNamespace(thd_packing=thd, config=SimpleNamespace(sequence_parallel=False))
    flat = rr.token_layout(routes, model)
    order = routes.reshape(8, 3, 2) if thd else routes.transpose(0, 1).reshape(8, 3, 2)
    assert torch.equal(flat, order)
    assert torch.equal(rr.batch_layout(flat[:, 1], (2, 4), model), routes[:, :, 1])
    model.config.sequence_parallel = True
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_world_size", lambda: 2)
    monkeypatch.setattr(parallel_state, "get_tensor_model_parallel_rank", lambda: 1)
    assert torch.equal(rr.token_layout(routes, model), order[4:])
    back = rr.batch_layout(order[4:, 0], (2, 4), model)
    assert torch.equal(back[back >= 0], routes[:, :, 0][back >= 0]) and int((back >= 0).all(-1).sum()) == 4
