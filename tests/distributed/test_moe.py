"""tiny-moe trains one optimizer step with EP=2 on 2 processes and with EP=1."""

import math

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.distributed.workers import ce_loss_fn, micro_batches, sequences, token_counts


def _worker(rank, world, ep):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.train.optim import build_optimizer, clip_grads, wrap_ddp
    from megatron_mtp_rl.train.schedule import configure, forward_backward

    platform.initialize(platform.ParallelSizes(expert_model_parallel_size=ep), seed=3)
    gpt = build_model(get_preset("tiny-moe"))
    model = wrap_ddp(gpt)
    configure(model)
    opt = build_optimizer(model, lr=1e-2)
    experts = [n for n, _ in gpt.named_parameters() if "local_experts" in n]
    before = {n: p.detach().clone() for n, p in gpt.named_parameters()}
    all_mbs = micro_batches(sequences(8, seed=rank), 2)
    main_n, mtp_n = token_counts(all_mbs)
    model.zero_grad_buffer()
    opt.zero_grad()
    losses = forward_backward(model, all_mbs, ce_loss_fn(main_n, mtp_n))
    norms = clip_grads(model, 1.0, 1.0)
    ok, _, _ = opt.step()
    changed = {n for n, p in gpt.named_parameters() if not torch.equal(p.detach(), before[n])}
    return {
        "ok": ok,
        "loss": sum(float(x["loss"]) for x in losses),
        "experts": experts,
        "changed": changed,
        "norms": (norms.main, norms.mtp),
    }


def _check(results, experts_per_rank):
    for r in results:
        assert r["ok"] and math.isfinite(r["loss"])
        assert len([e for e in r["experts"] if e.startswith("decoder.layers.0.")]) == 2 * experts_per_rank
        assert set(r["experts"]) <= r["changed"]  # every local expert received an update
        assert all(math.isfinite(x) and x > 0 for x in r["norms"])
    # Grad norms are collective: identical on every rank.
    assert len({r["norms"] for r in results}) == 1


def test_moe_ep2_trains_one_step(tmp_path):
    _check(run_ranks(_worker, 2, tmp_path, 2), experts_per_rank=2)


@pytest.mark.slow  # the EP=2 run is the fast one of this layout
def test_moe_ep1_trains_one_step(tmp_path):
    _check(run_ranks(_worker, 1, tmp_path, 1), experts_per_rank=4)
