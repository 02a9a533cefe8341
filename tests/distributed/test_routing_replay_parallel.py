"""R3 under pipeline (PP=2: each stage its own MoE layer) and expert parallelism (EP=2): every
packed token's experts are the given routes, on every rank."""

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.distributed.workers import micro_batches, sequences


def _routes(shape, layers=2, experts=4, topk=2):
    g = torch.Generator().manual_seed(7)
    r = torch.rand((*shape, layers, experts), generator=g).argsort(-1)[..., :topk]
    return r.to(torch.int16)


def _worker(rank, world, pp, ep):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.provider import RuntimeOptions
    from megatron_mtp_rl.models.routing_replay import token_layout, trunk_routers
    from megatron_mtp_rl.train.schedule import forward_backward

    sizes = platform.ParallelSizes(pipeline_model_parallel_size=pp, expert_model_parallel_size=ep)
    platform.initialize(sizes, seed=5)
    gpt = build_model(get_preset("tiny-moe"), runtime=RuntimeOptions(routing_replay=True))
    mbs = micro_batches(sequences(4, seed=rank if ep > 1 else 0), 2)
    for b in mbs:
        b.routes = _routes(tuple(b.tokens.shape))
    seen = {}
    for idx, rr in trunk_routers(gpt):
        router = next(m for m in gpt.modules() if getattr(m, "router_replay", None) is rr)
        router.register_forward_hook(lambda m, i, o, idx=idx: seen.setdefault(idx, []).append(o[1].clone()))
    gpt.route_replay.configure(source="routes")
    with torch.no_grad():
        forward_backward(gpt, mbs, None, forward_only=True, with_mtp=False)
    checked = 0
    for idx, maps in seen.items():
        for b, routing_map in zip(mbs, maps):
            want = token_layout(b.routes, gpt)[:, idx].long()
            expect = torch.zeros_like(routing_map).scatter_(1, want, True)
            assert torch.equal(routing_map, expect), (rank, idx)
            checked += int(routing_map.shape[0])
    return {"layers": sorted(seen), "checked": checked}


@pytest.mark.slow  # ~1 min of two spawned ranks; the single-process R3 test is fast
def test_r3_pp2_each_stage_replays_its_layers(tmp_path):
    stages = run_ranks(_worker, 2, tmp_path, 2, 1)
    assert [s["layers"] for s in stages] == [[0], [1]]
    assert all(s["checked"] > 0 for s in stages)


@pytest.mark.slow
def test_r3_ep2_replays_on_every_rank(tmp_path):
    ranks = run_ranks(_worker, 2, tmp_path, 1, 2)
    assert [r["layers"] for r in ranks] == [[0, 1], [0, 1]]
    assert all(r["checked"] > 0 for r in ranks)
