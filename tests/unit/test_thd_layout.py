"""The THD layout the GPU path uses: a packed batch flattened to one row, with cu_seqlens.

Transformer Engine attention runs THD only on CUDA (tests/gpu checks it end to end); here the
flattened batch runs with its block-diagonal mask, which proves the flattening, the per-row
segment ids and the way results come back to the [B, S] frame, MTP alignment included.
"""

import torch

from megatron_mtp_rl.models import pack_sequences


def _batch():
    g = torch.Generator().manual_seed(3)
    seqs = [
        (torch.randint(1, 60, (n,), generator=g).tolist(), torch.randint(1, 60, (m,), generator=g).tolist())
        for n, m in ((3, 5), (2, 4), (4, 6), (3, 3), (2, 2))
    ]
    return pack_sequences(seqs, 16)[0]


def test_cu_seqlens_follow_segments_and_padding():
    batch, _ = pack_sequences([([1, 2], [3]), ([4], [5, 6]), ([7, 8, 9], [1])], 6)
    assert batch.thd_lengths() == [3, 3, 4, 2]
    p = batch.packed_seq_params()
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == [0, 3, 6, 10, 12] and p.max_seqlen_q == 4
    flat = batch.flattened()
    assert flat.shape == (1, 12)
    assert flat.thd_lengths() == [3, 3, 4, 2]  # a row's last segment never merges with the next row's first


def test_flattened_rows_never_share_a_segment():
    batch = _batch()
    flat = batch.flattened()
    seg = flat.segment_ids[0].view(batch.shape)
    for r in range(1, batch.shape[0]):
        real_prev, real_here = seg[r - 1][seg[r - 1] > 0], seg[r][seg[r] > 0]
        assert not set(real_prev.tolist()) & set(real_here.tolist())


def test_flattened_forward_equals_the_row_forward(single_process):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, forward_logprobs, get_preset
    from megatron_mtp_rl.models.mtp_forward import forward_logprobs_packed

    platform.seed_everything(11)
    model = build_model(get_preset("tiny-dense").with_overrides(vocab_size=64, seq_length=16)).eval()
    batch = _batch()
    assert batch.shape[0] > 1 and int(batch.segment_ids.max()) > 1  # several rows, several segments per row
    kw = dict(with_entropy=True, with_draft_stats=True)
    with torch.no_grad():
        rows = forward_logprobs(model, batch, **kw)
        flat = forward_logprobs_packed(model, batch, None, **kw)
    m = batch.loss_mask
    torch.testing.assert_close(flat.logprobs[m], rows.logprobs[m], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flat.entropy[m], rows.entropy[m], rtol=1e-5, atol=1e-5)
    assert torch.equal(flat.mtp_mask, rows.mtp_mask)
    mm = rows.mtp_mask
    for name in ("mtp_logprobs", "mtp_accept", "mtp_top1"):
        torch.testing.assert_close(getattr(flat, name)[mm], getattr(rows, name)[mm], rtol=1e-5, atol=1e-5)
