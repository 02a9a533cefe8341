"""DP=2 over gloo: gradients equal a single process's on the same global batch."""

import torch

from tests.dist_utils import run_ranks
from tests.distributed.workers import (
    ce_loss_fn,
    grads_by_name,
    micro_batches,
    sequences,
    token_counts,
)


def _worker(rank, world, preset):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.train.optim import wrap_ddp
    from megatron_mtp_rl.train.schedule import configure, forward_backward

    platform.initialize(seed=11)
    model = wrap_ddp(build_model(get_preset(preset)))
    configure(model)
    seqs = sequences(8)
    all_mbs = micro_batches(seqs, 2)
    main_n, mtp_n = token_counts(all_mbs)
    per_rank = len(all_mbs) // world
    mine = all_mbs[rank * per_rank : (rank + 1) * per_rank]
    model.zero_grad_buffer()
    losses = forward_backward(model, mine, ce_loss_fn(main_n, mtp_n))
    return {"grads": grads_by_name(model), "loss": sum(float(x["loss"]) for x in losses)}


def test_dp2_gradients_equal_single_process(tmp_path):
    ref = run_ranks(_worker, 1, tmp_path / "dp1", "tiny-dense")[0]
    dp2 = run_ranks(_worker, 2, tmp_path / "dp2", "tiny-dense")
    assert abs(dp2[0]["loss"] + dp2[1]["loss"] - ref["loss"]) < 1e-5
    for res in dp2:
        assert res["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(res["grads"][name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for n, g in ref["grads"].items() if n.startswith("mtp."))
