"""PP=2: tiny-dense with its MTP block on the last stage, 1F1B with 2 micro-batches."""

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.distributed.workers import (
    ce_loss_fn,
    grads_by_name,
    micro_batches,
    sequences,
    token_counts,
)


def _worker(rank, world, full_state):
    from megatron.core import parallel_state

    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.state import full_name, load_full_state_dict
    from megatron_mtp_rl.train.optim import build_optimizer, wrap_ddp
    from megatron_mtp_rl.train.schedule import configure, forward_backward

    platform.initialize(platform.ParallelSizes(pipeline_model_parallel_size=world), seed=5)
    gpt = build_model(get_preset("tiny-dense"))
    if full_state is None:
        full_state = {k: v.clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
    else:
        load_full_state_dict(gpt, full_state)
    model = wrap_ddp(gpt)
    configure(model)
    opt = build_optimizer(model, lr=1e-2)
    mbs = micro_batches(sequences(4), 2)
    main_n, mtp_n = token_counts(mbs)
    model.zero_grad_buffer()
    opt.zero_grad()
    losses = forward_backward(model, mbs, ce_loss_fn(main_n, mtp_n))
    # megatron allocates an output_layer.weight on the tied MTP stage that nothing uses (it passes the
    # stage's embedding weight) and its checkpoint code refuses; the provider frees it.
    if gpt.mtp_process and not gpt.pre_process:
        assert "output_layer.weight" not in dict(gpt.named_parameters())
    grads = {full_name(gpt, k): v for k, v in grads_by_name(model).items()}
    ok, _, _ = opt.step()
    params = {full_name(gpt, n): p.detach().clone() for n, p in gpt.named_parameters()}
    return {
        "state": full_state,
        "loss": sum(float(x["loss"]) for x in losses) if losses else None,
        "grads": grads,
        "params": params,
        "has_mtp": gpt.mtp_process,
        "last": parallel_state.is_pipeline_last_stage(),
        "ok": ok,
    }


@pytest.mark.slow  # PP=2 == PP=1: tests/distributed/test_pp_rl_steps.py checks it fast through a whole RL run
def test_pp2_matches_pp1(tmp_path):
    ref = run_ranks(_worker, 1, tmp_path / "pp1", None)[0]
    stages = run_ranks(_worker, 2, tmp_path / "pp2", ref["state"])
    assert [s["has_mtp"] for s in stages] == [False, True]
    assert stages[0]["loss"] is None
    assert abs(stages[1]["loss"] - ref["loss"]) < 1e-5
    seen = set()
    for s in stages:
        assert s["ok"]
        for name, g in s["grads"].items():
            torch.testing.assert_close(g, ref["grads"][name], atol=1e-6, rtol=1e-4, msg=name)
            torch.testing.assert_close(s["params"][name], ref["params"][name], atol=1e-6, rtol=1e-4)
            seen.add(name)
    assert seen == set(ref["grads"])  # every parameter lives on some stage
