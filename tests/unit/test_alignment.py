"""Depth-k MTP alignment on a hand-built packed batch, and the model's aligned log-probs."""

import torch

from megatron_mtp_rl.models import aligned_mtp_mask, mtp_targets, pack_sequences


def _batch():
    # Row 0: seq A = prompt [11, 12] + response [13, 14, 15]; seq B = [21] + [22, 23].
    # Row 1: seq C = [31, 32, 33] + [34]; then padding.
    batch, where = pack_sequences([([11, 12], [13, 14, 15]), ([21], [22, 23]), ([31, 32, 33], [34])], seq_length=10)
    return batch, where


def test_pack_layout():
    batch, where = _batch()
    assert where == [(0, 0, 5), (0, 5, 3), (1, 0, 4)]
    assert batch.tokens[0].tolist() == [11, 12, 13, 14, 15, 21, 22, 23, 0, 0]
    assert batch.segment_ids[0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2, 0, 0]
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 0, 0]
    # labels[i] = tokens[i+1] inside a segment; the last token of a segment has no label.
    assert batch.labels[0].tolist() == [12, 13, 14, 15, 0, 22, 23, 0, 0, 0]
    # Loss on the positions whose label is a response token.
    assert batch.loss_mask[0].nonzero().flatten().tolist() == [1, 2, 3, 5, 6]
    assert batch.loss_mask[1].nonzero().flatten().tolist() == [2]


def test_depth_targets_and_masks_are_exactly_the_expected_ones():
    batch, _ = _batch()
    t1, v1 = mtp_targets(batch, 1)
    # Depth 1 at position p predicts labels[p+1] = tokens[p+2].
    assert t1[0].tolist() == [13, 14, 15, 0, 22, 23, 0, 0, 0, 0]
    # Valid: labels[p] and labels[p+1] both response tokens of p's sequence (p=0: labels[0] is the
    # prompt token 12, a draft never made; p=3: labels[4] is past seq A's end).
    assert v1[0].nonzero().flatten().tolist() == [1, 2, 5]
    assert v1[1].nonzero().flatten().tolist() == []  # seq C's one response token: nothing to draft
    t2, v2 = mtp_targets(batch, 2)
    assert t2[0].tolist() == [14, 15, 0, 22, 23, 0, 0, 0, 0, 0]
    assert v2[0].nonzero().flatten().tolist() == [1]
    assert v2[1].nonzero().flatten().tolist() == []
    # In the label frame both depths score the same tokens as the main head, minus the
    # first k response tokens of each sequence (position i-k is not a response position).
    assert aligned_mtp_mask(batch, 1)[0].nonzero().flatten().tolist() == [2, 3, 6]
    assert aligned_mtp_mask(batch, 2)[0].nonzero().flatten().tolist() == [3]
    for k in (1, 2):
        assert not (aligned_mtp_mask(batch, k) & ~batch.loss_mask).any()


def test_model_mtp_logprobs_are_aligned_to_the_main_targets(single_process):
    from megatron_mtp_rl.models import build_model, forward_logprobs, get_preset
    from megatron_mtp_rl.models.forward import gpt_forward, output_logits

    torch.manual_seed(0)
    model = build_model(get_preset("tiny-dense"))
    batch, _ = _batch()
    out = forward_logprobs(model, batch)
    # Brute force: full logits of every depth (the one GPT forward), then pick position i-k, token labels[i].
    with torch.no_grad():
        fwd = gpt_forward(model, batch.tokens, batch.position_ids, batch.attention_mask())
        chunks = [fwd.hidden, *fwd.mtp_hidden]
        for k in (1, 2):
            logp = torch.log_softmax(output_logits(model, chunks[k]).float(), -1)
            logp = logp.transpose(0, 1)  # [B, S, V]
            m = out.mtp_mask[k - 1]
            for b, i in m.nonzero().tolist():
                expect = logp[b, i - k, batch.labels[b, i]]
                assert abs(out.mtp_logprobs[k - 1, b, i].item() - expect.item()) < 1e-5
            assert torch.equal(m, aligned_mtp_mask(batch, k))
        main = torch.log_softmax(output_logits(model, chunks[0]).float(), -1)
        main = main.transpose(0, 1).gather(-1, batch.labels[..., None]).squeeze(-1)
        torch.testing.assert_close(out.logprobs, main, atol=1e-5, rtol=0)


def test_packing_equals_separate_sequences(single_process):
    """Block-diagonal masking makes a packed row score exactly like unpacked rows."""
    from megatron_mtp_rl.models import build_model, forward_logprobs, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("tiny-dense"))
    seqs = [([11, 12], [13, 14, 15]), ([21], [22, 23])]
    packed, where = pack_sequences(seqs, 10)
    alone = [pack_sequences([s], 10)[0] for s in seqs]
    out_p = forward_logprobs(model, packed)
    for (row, start, n), b in zip(where, alone):
        out_a = forward_logprobs(model, b)
        torch.testing.assert_close(out_p.logprobs[row, start : start + n], out_a.logprobs[0, :n], atol=1e-5, rtol=0)
        mp = out_p.mtp_logprobs[:, row, start : start + n] * out_p.mtp_mask[:, row, start : start + n]
        ma = out_a.mtp_logprobs[:, 0, :n] * out_a.mtp_mask[:, 0, :n]
        torch.testing.assert_close(mp, ma, atol=1e-5, rtol=0)
