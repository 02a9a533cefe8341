"""The RL scoring of a batch: per-token log-probs of the main head and of every MTP depth.

megatron-core's ``GPTModel.forward`` trains the MTP heads with its own cross-entropy and
never returns their logits. RL needs the log-probabilities of the *sampled* tokens under
each head, aligned to the same target token, so this module runs the one GPT forward
(:func:`~megatron_mtp_rl.models.forward.gpt_forward`) and scores targets with the
vocab-parallel, chunked :func:`~megatron_mtp_rl.ops.vocab_parallel_logprobs`. Full
vocabulary logits are never gathered.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from megatron.core import parallel_state

from megatron_mtp_rl.models.batch import TokenBatch, mtp_targets, shift_right
from megatron_mtp_rl.models.forward import gpt_forward, output_logits, output_weight, unwrap
from megatron_mtp_rl.ops import (
    vocab_parallel_draft_agreement,
    vocab_parallel_entropy,
    vocab_parallel_kl,
    vocab_parallel_logprobs,
)


@dataclass
class HeadLogProbs:
    """Per-token outputs in the label frame: index ``i`` refers to ``labels[:, i]``.

    ``mtp_*`` tensors are ``[D, B, S]``: depth ``k`` (row ``k-1``) at index ``i`` is the
    depth-k head's score of ``labels[i]``, computed at position ``i - k``.
    """

    logprobs: torch.Tensor  # [B, S] fp32
    loss_mask: torch.Tensor  # [B, S] bool
    mtp_logprobs: torch.Tensor | None = None  # [D, B, S] fp32
    mtp_mask: torch.Tensor | None = None  # [D, B, S] bool
    entropy: torch.Tensor | None = None  # [B, S] fp32
    mtp_accept: torch.Tensor | None = None  # [D, B, S] expected draft acceptance
    mtp_top1: torch.Tensor | None = None  # [D, B, S] 1.0 where argmax agrees
    # MTP-head objectives (``mtp_head``), on the detached MTP pass; label frame, masked by mtp_mask.
    head_logprobs: torch.Tensor | None = None  # [D, B, S] "ce": log q_k(label)
    head_kl: torch.Tensor | None = None  # [D, B, S] "distill": KL(p_main ‖ q_k), p_main detached

    @property
    def device(self) -> torch.device:
        """megatron's schedules ask the forward output for its device."""
        return self.logprobs.device

    @property
    def num_depths(self) -> int:
        return 0 if self.mtp_logprobs is None else self.mtp_logprobs.shape[0]


def forward_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    *,
    with_mtp: bool = True,
    detach_mtp: bool = False,
    with_entropy: bool = False,
    with_draft_stats: bool = False,
    chunk_size: int | None = None,
    mtp_head: str | None = None,
) -> HeadLogProbs | torch.Tensor:
    """Run this pipeline stage; the last stage returns :class:`HeadLogProbs` (``[B, S]`` frame).

    On the Transformer Engine path (``gpt.thd_packing``, set by the provider) the batch runs as
    one THD sequence with megatron's ``PackedSeqParams`` (``cu_seqlens``): TE's causal mask type
    would ignore the block-diagonal mask of a packed row. See :func:`forward_logprobs_packed`.
    """
    kwargs = dict(
        with_mtp=with_mtp,
        detach_mtp=detach_mtp,
        with_entropy=with_entropy,
        with_draft_stats=with_draft_stats,
        chunk_size=chunk_size,
        mtp_head=mtp_head,
    )
    if getattr(unwrap(model), "thd_packing", False):
        flat = batch.flattened()
        return forward_logprobs_packed(model, batch, flat.packed_seq_params(), **kwargs)
    return _forward_logprobs(model, batch, **kwargs)


def forward_logprobs_packed(model: torch.nn.Module, batch: TokenBatch, packed_seq_params, **kwargs):
    """:func:`forward_logprobs` over ``batch.flattened()`` (one ``[1, B*S]`` row), results back in
    the ``[B, S]`` frame. With ``packed_seq_params`` (THD, GPU) attention uses ``cu_seqlens``;
    with None the flattened batch's block-diagonal mask does the same job (CPU tests of the layout).
    Non-last pipeline stages return their ``[B*S, 1, H]`` hidden states.
    """
    b, s = batch.shape
    out = _forward_logprobs(model, batch.flattened(), packed_seq_params=packed_seq_params, **kwargs)
    if not isinstance(out, HeadLogProbs):
        return out
    for f in fields(out):
        t = getattr(out, f.name)
        if torch.is_tensor(t) and t.dim() >= 2 and tuple(t.shape[-2:]) == (1, b * s):
            setattr(out, f.name, t.reshape(*t.shape[:-2], b, s))
    out.loss_mask = batch.loss_mask
    return out


def _forward_logprobs(
    model: torch.nn.Module,
    batch: TokenBatch,
    *,
    with_mtp: bool = True,
    detach_mtp: bool = False,
    with_entropy: bool = False,
    with_draft_stats: bool = False,
    chunk_size: int | None = None,
    mtp_head: str | None = None,
    packed_seq_params=None,
) -> HeadLogProbs | torch.Tensor:
    """The forward of :func:`forward_logprobs` on one batch layout.

    ``detach_mtp`` cuts the MTP path off the trunk: the hidden states handed to the MTP
    block, the token embeddings it looks up and the shared output head are detached, so
    MTP losses reach the MTP layers only. Non-last pipeline stages return their hidden
    states for the schedule to send on. ``mtp_head`` ("ce" / "distill") adds the inputs of an
    MTP-head-only objective computed on a detached MTP pass (see :func:`_head_outputs`).
    """
    gpt = unwrap(model)
    fwd = gpt_forward(
        gpt,
        batch.tokens,
        batch.position_ids,
        None if packed_seq_params is not None else batch.attention_mask(),
        with_mtp=with_mtp,
        detach_mtp=detach_mtp,
        head_mtp_pass=bool(mtp_head) and with_mtp,
        packed_seq_params=packed_seq_params,
    )
    hidden, mtp_hidden = fwd.hidden, fwd.mtp_hidden
    if not gpt.post_process:
        return hidden

    tp_group = parallel_state.get_tensor_model_parallel_group()
    vocab = getattr(gpt, "real_vocab_size", None)
    weight = output_weight(gpt)
    labels_sb = batch.labels.t()  # work in Megatron's [S, B] layout: no copy of logits
    logits = output_logits(gpt, hidden, weight=weight)
    out = HeadLogProbs(
        logprobs=vocab_parallel_logprobs(
            logits, labels_sb, tp_group=tp_group, chunk_size=chunk_size, vocab_size=vocab
        ).t(),
        loss_mask=batch.loss_mask,
    )
    if with_entropy:
        out.entropy = vocab_parallel_entropy(logits, tp_group=tp_group, chunk_size=chunk_size, vocab_size=vocab).t()
    if not mtp_hidden:
        return out

    if detach_mtp:
        weight = (weight if weight is not None else gpt.output_layer.weight).detach()
    lps, masks, accepts, top1s = [], [], [], []
    for k, h in enumerate(mtp_hidden, start=1):
        targets, valid = mtp_targets(batch, k)
        mtp_logits = output_logits(gpt, h, weight=weight)
        lp = vocab_parallel_logprobs(
            mtp_logits, targets.t(), tp_group=tp_group, chunk_size=chunk_size, vocab_size=vocab
        )
        lps.append(shift_right(lp.t(), k))
        masks.append(shift_right(valid, k, fill=False))
        if with_draft_stats:
            s = logits.shape[0]
            acc = torch.zeros(batch.shape, dtype=torch.float32, device=lp.device)
            agree = torch.zeros_like(acc)
            if k < s:
                a, t1 = vocab_parallel_draft_agreement(
                    logits[k:].detach(),
                    mtp_logits[: s - k].detach(),
                    tp_group=tp_group,
                    chunk_size=chunk_size,
                    vocab_size=vocab,
                )
                acc[:, k:] = a.t()
                agree[:, k:] = t1.t()
            accepts.append(acc)
            top1s.append(agree)
    out.mtp_logprobs = torch.stack(lps)
    out.mtp_mask = torch.stack(masks)
    if with_draft_stats:
        out.mtp_accept = torch.stack(accepts)
        out.mtp_top1 = torch.stack(top1s)
    if mtp_head:
        _head_outputs(out, gpt, batch, logits, fwd.head_mtp_hidden, mtp_head, detach_mtp, tp_group, chunk_size, vocab)
    return out


def _head_outputs(out, gpt, batch, logits, head_hidden, kind, detached_regime, tp_group, chunk_size, vocab) -> None:
    """Inputs of the MTP-head objective (rl/head_loss.py), on the detached MTP pass.

    The MTP block ran a second time on detached trunk states and embeddings (gpt_forward's
    ``head_mtp_pass``) and the output weight is detached here, so these losses reach the MTP
    layers only. When the regime pass is itself detached it is the head pass, and "ce" reuses
    its log-prob tensor: ``detach`` ≡ ``none`` + head ``ce``, bit for bit.
    """
    if kind not in ("ce", "distill"):
        raise ValueError(f"unknown MTP head loss {kind!r}; choose 'ce' or 'distill'")
    if kind == "ce" and detached_regime:
        out.head_logprobs = out.mtp_logprobs
        return
    weight = output_weight(gpt)
    weight = (weight if weight is not None else gpt.output_layer.weight).detach()
    s, b = logits.shape[0], logits.shape[1]
    rows = []
    for k, h in enumerate(head_hidden, start=1):
        mtp_logits = output_logits(gpt, h, weight=weight)
        if kind == "ce":
            targets, _ = mtp_targets(batch, k)
            lp = vocab_parallel_logprobs(
                mtp_logits, targets.t(), tp_group=tp_group, chunk_size=chunk_size, vocab_size=vocab
            )
            rows.append(shift_right(lp.t(), k))
            continue
        # depth k at position t is aligned with the main head at t + k (both score labels[t + k])
        kl = logits.new_zeros((0, b), dtype=torch.float32)
        if k < s:
            kl = vocab_parallel_kl(
                mtp_logits[: s - k], logits[k:].detach(), tp_group=tp_group, chunk_size=chunk_size, vocab_size=vocab
            )
        kl = torch.cat([kl, kl.new_zeros((min(k, s), b))])  # the last k positions have no aligned token
        rows.append(shift_right(kl.t(), k))
    if kind == "ce":
        out.head_logprobs = torch.stack(rows)
    else:
        out.head_kl = torch.stack(rows)
