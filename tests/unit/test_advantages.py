"""Advantage estimators: per-sample and per-token outputs, the registry, and the packed batch they reach."""

import math
import statistics
from types import SimpleNamespace

import pytest
import torch

from megatron_mtp_rl import config as C
from megatron_mtp_rl.rl.advantages import ESTIMATORS, AdvantageInputs, Estimator, token_advantages
from megatron_mtp_rl.rollout.data import Prompt
from megatron_mtp_rl.rollout.manager import Sample

# A per-token estimator reachable by dotted path: advantage = 10·sample + position in the response.
POSITIONAL = Estimator(lambda x: 10.0 * torch.arange(x.mask.shape[0])[:, None] + torch.arange(x.mask.shape[1]))


def per_sample_hook(rewards, group_size, algo):
    """The long-standing hook signature: fn(rewards, group_size, algo) -> [N]."""
    return rewards * 2


def _inputs(rewards, group_size=2, lengths=None, **kw):
    n = len(rewards)
    lengths = lengths or [3] * n
    mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    algo = C.parse_config([]).algo
    return AdvantageInputs(torch.tensor(rewards), group_size, algo, mask, **kw)


def test_token_advantages_broadcasts_per_sample_values_and_zeroes_untrained_tokens():
    mask = torch.tensor([[True, True, False], [True, False, True]])
    got = token_advantages(torch.tensor([2.0, -1.0]), mask)
    assert got.tolist() == [[2.0, 2.0, 0.0], [-1.0, 0.0, -1.0]]
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert token_advantages(per_token, mask).tolist() == [[1.0, 2.0, 0.0], [4.0, 0.0, 6.0]]
    with pytest.raises(ValueError, match=r"shape \(2,\) or \(2, 3\)"):
        token_advantages(torch.zeros(3), mask)


def test_registry_and_dotted_paths(tmp_path):
    from megatron_mtp_rl.train.builders import build_advantage_estimator

    assert C.ADVANTAGE_ESTIMATORS == tuple(ESTIMATORS)
    x = _inputs([1.0, 0.0, 3.0, 3.0])
    grpo = build_advantage_estimator(C.parse_config([]))
    assert grpo(x).tolist() == pytest.approx([0.7071, -0.7071, 0.0, 0.0], abs=1e-4)
    hook = build_advantage_estimator(C.parse_config(["--advantage-estimator", f"{__name__}:per_sample_hook"]))
    assert hook(x).tolist() == [2.0, 0.0, 6.0, 6.0]
    token = build_advantage_estimator(C.parse_config(["--advantage-estimator", f"{__name__}:POSITIONAL"]))
    assert token is POSITIONAL and token(x)[2].tolist() == [20.0, 21.0, 22.0]
    problems = C.validate(C.parse_config(["--advantage-estimator", "ppo", "--gamma", "2"]), 1)
    assert any(p.startswith("--advantage-estimator 'ppo': not one of grpo, rloo") for p in problems)
    assert any(p.startswith("--gamma 2.0") for p in problems)
    dyn = ["--use-dynamic-batch-size", "--max-tokens-per-gpu", "64", "--advantage-estimator", "reinforce_plus_plus"]
    assert any("not with --balance-data" in p for p in C.validate(C.parse_config(dyn), 1))
    assert not any("balance" in p for p in C.validate(C.parse_config([*dyn, "--no-balance-data"]), 1))
    cfg = C.parse_config(["--gamma", "0.9", "--lam", "0.95"]).algo
    assert (cfg.gamma, cfg.lam) == (0.9, 0.95) and (C.AlgoConfig.gamma, C.AlgoConfig.lam) == (1.0, 1.0)


def test_advantages_reach_the_packed_batch_per_token(single_process):
    """Per-token estimator output lands on each sample's response tokens of the packed batch; per-sample
    output is broadcast exactly as the per-sample packing path writes it."""
    from megatron_mtp_rl.train.step import advantages, build_micro_batches

    p = Prompt("q", None, 0)
    samples = [Sample(p, [1, 2], [3] * n, [], "", True) for n in (3, 1, 2, 4)]
    cfg = C.parse_config(["--n-samples-per-prompt", "2"])

    def packed(est):
        spans: dict = {}
        mbs = build_micro_batches(samples, [0.0] * 4, 2, 16, False, keys=list(range(4)), spans=spans)
        ctx = SimpleNamespace(cfg=cfg, advantage_fn=est)
        return mbs, advantages(ctx, torch.tensor([1.0, 0.0, 0.0, 2.0]), spans), spans

    mbs, adv, spans = packed(POSITIONAL)
    assert len(mbs) == 2
    assert adv.shape == (4, 4)
    for i, n in enumerate((3, 1, 2, 4)):
        mb, row, a, b = spans[i]
        assert mb.advantages[row, a:b].tolist() == [10.0 * i + t for t in range(n)]
        assert mb.loss_mask[row, a:b].all() and not mb.advantages[~mb.loss_mask].any()
    want = ESTIMATORS["grpo"](_inputs([1.0, 0.0, 0.0, 2.0])).tolist()
    mbs, adv, _ = packed(ESTIMATORS["grpo"])
    ref = build_micro_batches(samples, want, 2, 16, False)  # the per-sample packing path
    for got_mb, ref_mb in zip(mbs, ref):
        assert torch.equal(got_mb.advantages, ref_mb.advantages)
    with pytest.raises(ValueError, match="needs values"):
        packed(Estimator(lambda x: x.values, needs=("values",)))


def test_rloo_by_hand_and_its_group_size_error():
    x = _inputs([1.0, 0.0, 0.0, 2.0, 2.0, 5.0], group_size=3)
    assert ESTIMATORS["rloo"](x).tolist() == pytest.approx([1.0, -0.5, -0.5, -1.5, -1.5, 3.0])
    with pytest.raises(ValueError, match="at least 2 samples per prompt"):
        ESTIMATORS["rloo"](_inputs([1.0, 0.0], group_size=1))
    problems = C.validate(C.parse_config(["--advantage-estimator", "rloo", "--n-samples-per-prompt", "1"]), 1)
    assert "--n-samples-per-prompt must be ≥ 2 (group-normalised advantages)" in problems


def _whitened_by_hand(values):
    mean, var = statistics.mean(values), statistics.variance(values)  # Bessel-corrected
    return [(v - mean) / math.sqrt(var + 1e-8) for v in values]


def test_reinforce_plus_plus_by_hand():
    """γ = 0.5, k1 KL folded into the token rewards, a masked-out (tool) token skipped by the returns."""
    from megatron_mtp_rl.train.builders import build_advantage_estimator, build_loss

    mask = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0]], dtype=torch.bool)
    old = -torch.ones(2, 4)
    kl = torch.tensor([[0.2, 0.4, 9.0, 0.6], [0.1, 0.3, 9.0, 9.0]])
    argv = ["--advantage-estimator", "reinforce_plus_plus", "--gamma", "0.5", "--kl-coef", "0.1", "--kl-type", "k1"]
    cfg = C.parse_config(argv)
    x = AdvantageInputs(torch.tensor([1.0, 0.0]), 2, cfg.algo, mask, old_logprobs=old, ref_logprobs=old - kl)
    got = build_advantage_estimator(cfg)(x)
    # token rewards: -0.1·KL on each policy token, plus R on the last one; G_t = r_t + 0.5·G_next.
    g0_3 = 1.0 - 0.06
    g0_1 = -0.04 + 0.5 * g0_3
    g0_0 = -0.02 + 0.5 * g0_1
    g1_1 = -0.03
    g1_0 = -0.01 + 0.5 * g1_1
    want = _whitened_by_hand([g0_0, g0_1, g0_3, g1_0, g1_1])
    assert got[mask].tolist() == pytest.approx(want, abs=1e-5)
    assert not got[~mask].any()
    assert build_loss(cfg).kl_coef == 0.0  # the KL is in the rewards, not in the loss
    assert build_loss(C.parse_config(["--kl-coef", "0.1"])).kl_coef == 0.1


def test_reinforce_plus_plus_baseline_by_hand():
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [0, 1]], dtype=torch.bool)
    x = AdvantageInputs(torch.tensor([1.0, 0.0, 3.0, 1.0]), 2, C.parse_config([]).algo, mask)
    got = ESTIMATORS["reinforce_plus_plus_baseline"](x)
    # r − mean_group: [0.5, −0.5, 1, −1], on each policy token, then whitened over all of them
    want = _whitened_by_hand([0.5, 0.5, -0.5, 1.0, 1.0, -1.0])
    assert got[mask].tolist() == pytest.approx(want, abs=1e-5) and not got[~mask].any()


def test_whiten_by_hand():
    from megatron_mtp_rl.rl.advantages import whiten
    from tests.distributed.test_data_parallel import whiten_inputs

    values, mask = whiten_inputs()  # also whitened over 2 DP ranks in tests/distributed/test_data_parallel.py
    got = whiten(values, mask)
    assert got[mask].tolist() == pytest.approx(_whitened_by_hand(values[mask].tolist()), abs=1e-5)
    assert not got[~mask].any()


def test_opd_by_hand():
    mask = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.3, -9.0]])
    teacher = torch.tensor([[-0.5, -5.0, -1.5], [-0.2, -0.1, -1.0]])
    algo = C.parse_config(["--opd-coef", "0.5", "--no-grpo-std-normalization"]).algo
    x = AdvantageInputs(torch.tensor([1.0, 0.0]), 2, algo, mask, old_logprobs=old, teacher_logprobs=teacher)
    got = token_advantages(ESTIMATORS["opd"](x), mask)
    # log p_teacher − log π_old, plus 0.5 × the GRPO advantage (r − group mean: +0.5, −0.5)
    want = torch.tensor([[0.5 + 0.25, 0.0, -1.0 + 0.25], [0.0 - 0.25, 0.2 - 0.25, 0.0]])
    torch.testing.assert_close(got, want)
    assert ESTIMATORS["opd"].needs == ("old_logprobs", "teacher_logprobs")
    problems = C.validate(C.parse_config(["--advantage-estimator", "opd"]), 1)
    assert "--advantage-estimator opd needs a teacher: --teacher-load DIR" in problems
