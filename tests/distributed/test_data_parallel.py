"""DP=2 over gloo: gradients (and advantage whitening) equal a single process's on the same global batch."""

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
    return {"grads": grads_by_name(model), "loss": sum(float(x["loss"]) for x in losses), **_whitened(rank, world)}


def whiten_inputs():
    """Per-token values and a mask whose rows hold uneven token counts (rank 0's half holds 2 tokens)."""
    g = torch.Generator().manual_seed(3)
    values = torch.randn(6, 5, generator=g) * 3 + 1
    mask = torch.rand(6, 5, generator=g) > 0.3
    mask[:3] = False
    mask[0, :2] = True
    return values, mask


def _whitened(rank, world):
    """REINFORCE++'s whitening of this rank's rows over the DP group, and how many all-reduces it took."""
    from megatron.core import parallel_state

    import megatron_mtp_rl.rl.advantages as adv

    values, mask = whiten_inputs()
    half = values.shape[0] // world
    mine = slice(rank * half, (rank + 1) * half)
    calls, real = [], adv.dist.all_reduce
    adv.dist.all_reduce = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        out = adv.whiten(values[mine], mask[mine], parallel_state.get_data_parallel_group())
    finally:
        adv.dist.all_reduce = real
    return {"whitened": out, "whiten_all_reduces": len(calls)}


@pytest.mark.slow  # DP=2: test_two_process_job[dp2] and the OCC reducer test are the fast ones
def test_dp2_gradients_equal_single_process(tmp_path):
    ref = run_ranks(_worker, 1, tmp_path / "dp1", "tiny-dense")[0]
    dp2 = run_ranks(_worker, 2, tmp_path / "dp2", "tiny-dense")
    assert abs(dp2[0]["loss"] + dp2[1]["loss"] - ref["loss"]) < 1e-5
    for res in dp2:
        assert res["grads"].keys() == ref["grads"].keys()
        for name, g in ref["grads"].items():
            torch.testing.assert_close(res["grads"][name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert any(g.abs().sum() > 0 for n, g in ref["grads"].items() if n.startswith("mtp."))
    # Whitening over the global batch: two ranks, one all-reduce each, equal the one-process result.
    torch.testing.assert_close(torch.cat([r["whitened"] for r in dp2]), ref["whitened"], rtol=1e-6, atol=1e-6)
    assert [r["whiten_all_reduces"] for r in dp2] == [1, 1]
    values, mask = whiten_inputs()
    assert not torch.equal(ref["whitened"], values * mask) and not ref["whitened"][~mask].any()
