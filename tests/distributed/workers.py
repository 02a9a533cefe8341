"""Shared pieces of the multi-process tests: a fixed data set and a CE-style loss."""

from __future__ import annotations

import torch

from megatron_mtp_rl.models import pack_sequences


def sequences(n: int, seed: int = 3, vocab: int = 60) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p = torch.randint(1, vocab, (3 + i % 3,), generator=g).tolist()
        r = torch.randint(1, vocab, (4 + i % 4,), generator=g).tolist()
        out.append((p, r))
    return out


def micro_batches(seqs, per_mb: int, seq_len: int = 16):
    return [pack_sequences(seqs[i : i + per_mb], seq_len, rows=per_mb)[0] for i in range(0, len(seqs), per_mb)]


def ce_loss_fn(total_main: float, total_mtp: float):
    """-(Σ main log-probs)/N_main - (Σ MTP log-probs)/N_mtp with global token counts."""

    def fn(batch, out):
        main = -(out.logprobs * out.loss_mask).sum() / total_main
        mtp = -(out.mtp_logprobs * out.mtp_mask).sum() / total_mtp if out.num_depths else 0.0
        loss = main + mtp
        return loss, {"loss": loss.detach()}

    return fn


def token_counts(mbs):
    from megatron_mtp_rl.models import aligned_mtp_mask

    main = sum(int(b.loss_mask.sum()) for b in mbs)
    mtp = sum(int(aligned_mtp_mask(b, k).sum()) for b in mbs for k in (1, 2))
    return main, mtp


def grads_by_name(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        g = getattr(p, "main_grad", None)
        if g is None:
            g = p.grad
        out[name.removeprefix("module.")] = g.detach().clone()
    return out
