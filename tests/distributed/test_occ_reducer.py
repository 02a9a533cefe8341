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
                "skipped": m["occ/skipped_updates"],
            }
        )
    return history, _informative_check(rank)


def test_lambda_identical_on_ranks_and_equal_to_union(tmp_path):
    two_res = run_ranks(_worker, 2, tmp_path / "dp2", [[0], [1]])
    one = run_ranks(_worker, 1, tmp_path / "dp1", [[0, 1]])[0][0]
    two = [h for h, _ in two_res]
    for lams, skipped in (inf for _, inf in two_res):
        assert lams[0] == [0.7] and lams[1] == [pytest.approx(0.25)] and skipped == 1
    for step in range(3):
        a, b, ref = two[0][step], two[1][step], one[step]
        assert a["lambdas"] == b["lambdas"]  # bit-identical on both ranks
        assert a["tokens"] == ref["tokens"]
        assert a["lambdas"] == pytest.approx(ref["lambdas"], rel=1e-4, abs=1e-7)
        assert a["A"] == pytest.approx(ref["A"], rel=1e-4, abs=1e-9)
        assert a["V"] == pytest.approx(ref["V"], rel=1e-4)
        assert a["stat_all_reduces"] == 1 and b["stat_all_reduces"] == 1
    # Step 1 runs with θ = θ_old: A = 0 exactly, an uninformative step: λ keeps --occ-init
    # (ρ/D = 0.25) on both ranks and the skip is counted; later steps move λ.
    for r in (0, 1):
        assert two[r][0]["A"] == [0.0, 0.0] and two[r][0]["lambdas"] == [0.25, 0.25]
        assert two[r][0]["skipped"] == 2 and two[r][1]["skipped"] == 2
    assert any(abs(x) > 0 for x in two[0][1]["A"])
    assert two[0][1]["lambdas"] != [0.25, 0.25]
    # The λ used in a step is the one reduced after the previous step (lag of one).
    assert two[0][0]["coef_used"] == pytest.approx([0.25, 0.25])  # --occ-init = ρ/D
    assert two[0][1]["coef_used"] == pytest.approx([0.25, 0.25])  # the θ = θ_old step left it
    assert two[0][2]["coef_used"] == pytest.approx(two[0][1]["lambdas"])


def _informative_check(rank):
    """Rank 0 sees only d = 0 tokens, rank 1 some d ≠ 0: the decision is global."""
    from megatron_mtp_rl.rl import OCCConfig, OCCEstimator

    est = OCCEstimator(1, OCCConfig(ratio=1.0, eps=0.0, lo=-5, hi=5, init=0.7))
    out = []
    # Step 1: every rank's d is exactly 0 → λ kept everywhere.
    est.accumulate(torch.tensor([[0.0, 2.0, 4.0, 0.0]], dtype=torch.float64))
    est.reduce()
    out.append(list(est.lambdas))
    # Step 2: only rank 1 has d ≠ 0 → informative on both ranks: λ = (0 + 1) / (2 + 2) = 0.25.
    row = [0.0, 2.0, 4.0, 0.0] if rank == 0 else [1.0, 2.0, 4.0, 3.0]
    est.accumulate(torch.tensor([row], dtype=torch.float64))
    est.reduce()
    out.append(list(est.lambdas))
    return out, est.skipped_updates
