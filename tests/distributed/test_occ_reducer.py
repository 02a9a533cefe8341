"""The OCC reducer on 2 gloo ranks with different data."""

import pytest
import torch

from tests.dist_utils import run_ranks


def _worker(rank, world, data_ranks):
    import megatron_mtp_rl.rl.occ as occ_mod
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, get_preset, pack_sequences
    from megatron_mtp_rl.rl import OCCConfig, OCCEstimator, RLBatch, RLLossConfig
    from megatron_mtp_rl.train.optim import build_optimizer, wrap_ddp
    from megatron_mtp_rl.train.step import attach_occ, compute_old_logprobs, train_step
    from tests.distributed.workers import sequences

    class CountingDist:
        calls = 0

        def __getattr__(self, name):
            return getattr(torch.distributed, name)

        def all_reduce(self, *args, **kwargs):
            CountingDist.calls += 1
            return torch.distributed.all_reduce(*args, **kwargs)

    occ_mod.dist = CountingDist()
    platform.initialize(seed=21)
    model = wrap_ddp(build_model(get_preset("tiny-dense")))
    opt = build_optimizer(model, lr=3e-3)
    occ = OCCEstimator(2, OCCConfig(ratio=0.5, hi=10.0, lo=-10.0))
    attach_occ(model, occ)
    batches = []
    for r in data_ranks[rank]:
        seqs = sequences(4, seed=100 + r)
        b, _ = pack_sequences(seqs, 24, rows=2)
        adv = torch.randn(b.tokens.shape, generator=torch.Generator().manual_seed(r)) * b.loss_mask
        batches.append(RLBatch(**b.__dict__, advantages=adv))
    compute_old_logprobs(model, batches, with_mtp=True)
    cfg = RLLossConfig(mtp_regime="occ")
    history = []
    for _ in range(3):
        before = CountingDist.calls
        m = train_step(model, opt, batches, cfg, occ)
        history.append(
            {
                "lambdas": list(occ.lambdas),
                "A": [m["occ/alignment_1"], m["occ/alignment_2"]],
                "V": [m["occ/variance_1"], m["occ/variance_2"]],
                "tokens": m["occ/tokens"],
                "stat_all_reduces": CountingDist.calls - before,
                "coef_used": [m["mtp/coef_1"], m["mtp/coef_2"]],
            }
        )
    return history


def test_lambda_identical_on_ranks_and_equal_to_union(tmp_path):
    two = run_ranks(_worker, 2, tmp_path / "dp2", [[0], [1]])
    one = run_ranks(_worker, 1, tmp_path / "dp1", [[0, 1]])[0]
    for step in range(3):
        a, b, ref = two[0][step], two[1][step], one[step]
        assert a["lambdas"] == b["lambdas"]  # bit-identical on both ranks
        assert a["tokens"] == ref["tokens"]
        assert a["lambdas"] == pytest.approx(ref["lambdas"], rel=1e-4, abs=1e-7)
        assert a["A"] == pytest.approx(ref["A"], rel=1e-4, abs=1e-9)
        assert a["V"] == pytest.approx(ref["V"], rel=1e-4)
        assert a["stat_all_reduces"] == 1 and b["stat_all_reduces"] == 1
    # Step 1 runs with θ = θ_old: A = 0 exactly, so λ = 0; later steps move.
    assert two[0][0]["A"] == [0.0, 0.0] and two[0][0]["lambdas"] == [0.0, 0.0]
    assert any(abs(x) > 0 for x in two[0][1]["A"])
    # The λ used in a step is the one reduced after the previous step (lag of one).
    assert two[0][0]["coef_used"] == pytest.approx([0.25, 0.25])  # --occ-init = ρ/D
    assert two[0][2]["coef_used"] == pytest.approx(two[0][1]["lambdas"])
