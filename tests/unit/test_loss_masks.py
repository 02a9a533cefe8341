"""Per-token loss masks (tool / environment output): every loss term, OCC, MTP alignment and the dump."""

import pytest
import torch

from megatron_mtp_rl.models import aligned_mtp_mask
from megatron_mtp_rl.models.batch import supervised_mtp_mask
from megatron_mtp_rl.models.mtp_forward import HeadLogProbs
from megatron_mtp_rl.rl import OCCConfig, OCCEstimator, RLLoss, RLLossConfig
from megatron_mtp_rl.rl.loss import step_denominators
from megatron_mtp_rl.rl.mismatch import tis_weights
from megatron_mtp_rl.rl.policy_loss import clipped_surrogate, kl_penalty
from megatron_mtp_rl.rollout.data import Prompt
from megatron_mtp_rl.rollout.dump import rollout_records
from megatron_mtp_rl.rollout.manager import Sample
from megatron_mtp_rl.train.step import build_micro_batches

S = 16
# Sample A: prompt [11, 12], response [13 .. 18] whose third token (15) is tool output; sample B has no mask.
# Label frame (labels[i] = tokens[i+1]): A's response is labels[1..6], the tool token labels[3]; B's is labels[8..10].
TOOL_INDEX = 3
# The MTP alignment rule by hand: depth k scores labels[i] (from position i-k) only when labels[i-k] and
# labels[i] are both policy tokens of the same sequence. Depth 2 at i=4 reads across the tool token at 3:
# both ends are the policy's, so it counts.
EXPECTED_MTP = {1: [2, 5, 6, 9, 10], 2: [4, 6, 10]}


def _samples(masked: bool):
    p = Prompt("q", None, 0)
    mask = [1, 1, 0, 1, 1, 1] if masked else None
    lp_a = [-0.5, -0.7, 0.0, -0.2, -0.9, -0.4]  # the tool token's engine log-prob is a placeholder
    return [
        Sample(p, [11, 12], [13, 14, 15, 16, 17, 18], lp_a, "", True, loss_mask=mask),
        Sample(p, [21], [22, 23, 24], [-0.3, -0.6, -0.1], "", True),
    ]


def _batch(masked: bool):
    (b,) = build_micro_batches(_samples(masked), [0.0, 0.0], 2, S, False)
    g = torch.Generator().manual_seed(0)
    b.advantages = torch.randn(1, S, generator=g) * b.loss_mask  # per-token advantages
    b.old_logprobs = -torch.rand(1, S, generator=g) - 0.1
    b.ref_logprobs = b.old_logprobs + 0.2 * torch.randn(1, S, generator=g)
    b.old_mtp_logprobs = b.old_logprobs[None].repeat(2, 1, 1) + 0.1 * torch.randn(2, 1, S, generator=g)
    return b


@pytest.fixture(scope="module")
def leaves():
    g = torch.Generator().manual_seed(1)
    return {
        "logprobs": (-torch.rand(1, S, generator=g) - 0.1).requires_grad_(),
        "entropy": torch.rand(1, S, generator=g).requires_grad_(),
        "mtp_logprobs": (-torch.rand(2, 1, S, generator=g) - 0.1).requires_grad_(),
        "mtp_accept": torch.rand(2, 1, S, generator=g),
    }


def _out(batch, leaves):
    return HeadLogProbs(
        logprobs=leaves["logprobs"],
        loss_mask=batch.loss_mask,
        entropy=leaves["entropy"],
        mtp_logprobs=leaves["mtp_logprobs"],
        mtp_mask=torch.stack([aligned_mtp_mask(batch, k) for k in (1, 2)]),
        mtp_accept=leaves["mtp_accept"],
        mtp_top1=(leaves["mtp_accept"] > 0.5).float(),
    )


def _hand_agg(x, w, mode):
    seqs = [slice(0, 8), slice(8, S)]  # A, then B and the padding
    if mode == "token-mean":
        return (x * w).sum() / w.sum()
    per = [((x * w)[0, s].sum(), w[0, s].sum()) for s in seqs]
    if mode == "seq-mean-token-sum":
        return sum(t for t, _ in per) / 2
    return sum(t / c for t, c in per) / 2


def test_alignment_rule_and_packing_keep_tool_tokens_out():
    masked, plain = _batch(True), _batch(False)
    assert (plain.loss_mask & ~masked.loss_mask).nonzero().tolist() == [[0, TOOL_INDEX]]
    for k, want in EXPECTED_MTP.items():
        assert aligned_mtp_mask(masked, k)[0].nonzero().flatten().tolist() == want
    # the warm start's supervised rule: the target alone, so depth k also learns the first answer tokens
    # (drafted from the prompt: labels[1] from position 0, labels[9] from B's prompt at 8) and the tokens
    # after a tool span (labels[4] from the tool position 3); never across sequences (labels[8] from A's 7)
    supervised = {1: [1, 2, 4, 5, 6, 9, 10], 2: [2, 4, 5, 6, 10]}
    for k, want in supervised.items():
        assert supervised_mtp_mask(masked, k)[0].nonzero().flatten().tolist() == want
    bad = _samples(True)
    bad[0].loss_mask = [1, 0]
    with pytest.raises(ValueError, match="loss_mask has 2 entries for 6 response tokens"):
        build_micro_batches(bad, [0.0, 0.0], 2, S, False)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"])
def test_masked_tool_span_gives_the_gradients_of_the_terms_zeroed_by_hand(leaves, mode):
    """RLLoss on the masked sample == the unmasked sample with the tool token's advantage, KL, entropy and
    MTP terms zeroed by hand; OCC's S_A, S_V, N and the per-token metrics count only the policy's tokens."""
    masked = _batch(True)
    cfg = RLLossConfig(kl_coef=0.1, entropy_coef=0.01, tis_cap=2.0, mtp_regime="occ", loss_agg_mode=mode)
    occ = OCCEstimator(2, OCCConfig(init=0.3))
    fn = RLLoss(cfg, step_denominators([masked], 2), occ, mtp_coef_override=[0.3, 0.2])
    loss, metrics = fn(masked, _out(masked, leaves))

    plain = _batch(False)  # the tool token is trained here, unless zeroed by hand
    w = plain.loss_mask.clone()
    w[0, TOOL_INDEX] = False
    lp, ent, mlp = leaves["logprobs"], leaves["entropy"], leaves["mtp_logprobs"]
    adv = plain.advantages * w
    tis = tis_weights(plain.old_logprobs, plain.rollout_logprobs, 2.0)
    pg = clipped_surrogate(lp - plain.old_logprobs, adv, eps_clip=0.2).loss * tis
    kl = kl_penalty(lp, plain.ref_logprobs, "low-var-kl")
    hand = _hand_agg(pg, w, mode) + 0.1 * _hand_agg(kl, w, mode) - 0.01 * _hand_agg(ent, w, mode)
    for k, coef in ((1, 0.3), (2, 0.2)):
        wk = torch.zeros(1, S, dtype=torch.bool)
        wk[0, EXPECTED_MTP[k]] = True
        sur = clipped_surrogate(mlp[k - 1] - plain.old_mtp_logprobs[k - 1], adv, eps_clip=0.2).loss
        hand = hand + coef * _hand_agg(sur, wk, mode)
        d = (lp - plain.old_logprobs).double()[wk]
        e = (mlp[k - 1] - plain.old_logprobs).double()[wk]
        want = torch.stack([(d * e).sum(), (e * e).sum(), torch.tensor(float(len(EXPECTED_MTP[k])))])
        torch.testing.assert_close(occ._stats[k - 1, :3], want.detach())
        assert metrics[f"mtp/accept_{k}"][1] == len(EXPECTED_MTP[k])
    got = torch.autograd.grad(loss, [lp, ent, mlp])
    want = torch.autograd.grad(hand, [lp, ent, mlp])
    for g, h in zip(got, want):
        torch.testing.assert_close(g, h, rtol=1e-6, atol=1e-7)
    assert got[0][0, TOOL_INDEX] == 0 and got[1][0, TOOL_INDEX] == 0
    for name in ("train/kl", "train/entropy", "train/ratio", "train/tis_weight", "rollout/logprob_abs_diff"):
        assert metrics[name][1] == 8, name  # 5 policy tokens of A + 3 of B


def test_dump_marks_tool_spans_and_compares_policy_log_probs_only():
    from tools.show_rollouts import render

    s = _samples(True)[0]
    trainer = [-0.5, -0.7, -9.0, -0.2, -0.9, -0.4]  # the tool token's gap would be 9
    (rec,) = rollout_records(1, [s], [0.5], [trainer], decode=lambda ids: " ".join(map(str, ids)))
    assert rec["tool_spans"] == [[2, 3]] and rec["policy_tokens"] == 5
    assert rec["response_marked"] == "13 14⟦tool⟧15⟦/tool⟧16 17 18"
    assert rec["logprob_gap"]["abs_max"] == 0 and rec["logprob_gap"]["tokens"] == 5
    text = render(rec)
    assert "tool spans [[2, 3]]: not trained" in text and "⟦tool⟧15⟦/tool⟧" in text
