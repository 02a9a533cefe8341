"""The packed token batch the model consumes, and the depth-k alignment of MTP targets.

Conventions (Megatron's): ``labels[b, i] = tokens[b, i + 1]``; the main head at position
``i`` scores ``labels[i]``; MTP depth ``k`` (1-based) at position ``p`` scores
``labels[p + k]``. Several sequences may share a row ("packing"); ``segment_ids`` numbers
them from 1 and marks padding with 0.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TokenBatch:
    """One micro-batch of packed sequences, all tensors ``[B, S]``."""

    tokens: torch.Tensor  # int64 input ids
    labels: torch.Tensor  # int64, labels[i] = tokens[i + 1] within a segment, else 0
    loss_mask: torch.Tensor  # bool: labels[i] is a response token of the same segment
    segment_ids: torch.Tensor  # int64: 1.. per packed sequence, 0 = padding
    position_ids: torch.Tensor  # int64: restarts at 0 in every segment

    def to(self, device) -> TokenBatch:
        return TokenBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.tokens.shape)  # type: ignore[return-value]

    def attention_mask(self) -> torch.Tensor:
        """Block-diagonal causal mask ``[B, 1, S, S]``, True = masked (Megatron's convention).

        A padding position attends only to itself, so no softmax row is empty.
        """
        seg = self.segment_ids
        s = seg.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril()
        same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
        eye = torch.eye(s, dtype=torch.bool, device=seg.device)
        allowed = (same & causal) | eye
        return ~allowed[:, None]

    def flattened(self) -> TokenBatch:
        """The same tokens as one ``[1, B*S]`` row (THD layout); segment ids stay unique per row.

        Every per-token result of the flattened batch, reshaped to ``[B, S]``, is the result of
        this batch: nothing crosses a row boundary, because each row's sequences stay separate
        segments and a row ends in padding or at a segment's end.
        """
        b, s = self.shape
        offset = torch.arange(b, device=self.segment_ids.device)[:, None] * (s + 1)
        seg = torch.where(self.segment_ids > 0, self.segment_ids + offset, torch.zeros_like(self.segment_ids))
        return TokenBatch(
            tokens=self.tokens.reshape(1, -1),
            labels=self.labels.reshape(1, -1),
            loss_mask=self.loss_mask.reshape(1, -1),
            segment_ids=seg.reshape(1, -1),
            position_ids=self.position_ids.reshape(1, -1),
        )

    def thd_lengths(self) -> list[int]:
        """Lengths of the sequences of the flattened ``[1, B*S]`` layout (THD), in order.

        Every packed sequence is one entry; the padding run at the end of a row is one more
        (it is masked out of every loss, and as its own sequence attends to nothing real).
        """
        lengths: list[int] = []
        for row in self.segment_ids.tolist():
            run, prev = 0, None
            for seg in row:
                if run and seg != prev:
                    lengths.append(run)
                    run = 0
                run += 1
                prev = seg
            if run:
                lengths.append(run)
        return lengths

    def packed_seq_params(self):
        """megatron's ``PackedSeqParams`` (``qkv_format="thd"``) for the flattened batch.

        The GPU path feeds ``tokens.view(1, -1)`` with these instead of the block-diagonal
        mask, which Transformer Engine's causal mask type would ignore.
        """
        from megatron.core.packed_seq_params import PackedSeqParams

        lengths = self.thd_lengths()
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=self.tokens.device)
        cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
        longest = max(lengths)
        return PackedSeqParams(
            qkv_format="thd",
            cu_seqlens_q=cu,
            cu_seqlens_kv=cu,
            cu_seqlens_q_padded=cu,
            cu_seqlens_kv_padded=cu,
            max_seqlen_q=longest,
            max_seqlen_kv=longest,
        )


def pack_sequences(
    sequences: list[tuple[list[int], list[int]]],
    seq_length: int,
    *,
    pad_id: int = 0,
    rows: int | None = None,
) -> tuple[TokenBatch, list[tuple[int, int, int]]]:
    """Pack ``(prompt_ids, response_ids)`` pairs into rows of ``seq_length`` (first fit).

    Returns the batch and, per input sequence, ``(row, start, length)`` so per-token
    results can be mapped back. ``loss_mask`` covers the response tokens.
    """
    placements: list[tuple[int, int, int]] = []
    used: list[int] = []
    for prompt, response in sequences:
        n = len(prompt) + len(response)
        if n > seq_length:
            raise ValueError(f"sequence of {n} tokens exceeds --seq-length {seq_length}")
        r = next((i for i, u in enumerate(used) if u + n <= seq_length), len(used))
        if r == len(used):
            used.append(0)
        placements.append((r, used[r], n))
        used[r] += n
    num_rows = max(rows or 0, len(used), 1)
    tokens = torch.full((num_rows, seq_length), pad_id, dtype=torch.long)
    labels = torch.zeros((num_rows, seq_length), dtype=torch.long)
    loss_mask = torch.zeros((num_rows, seq_length), dtype=torch.bool)
    segment_ids = torch.zeros((num_rows, seq_length), dtype=torch.long)
    position_ids = torch.zeros((num_rows, seq_length), dtype=torch.long)
    next_segment = [1] * num_rows
    for (prompt, response), (r, start, n) in zip(sequences, placements):
        ids = torch.tensor(list(prompt) + list(response), dtype=torch.long)
        tokens[r, start : start + n] = ids
        labels[r, start : start + n - 1] = ids[1:]
        # labels[i] is token i+1: response tokens start at index len(prompt).
        loss_mask[r, start + len(prompt) - 1 : start + n - 1] = True
        segment_ids[r, start : start + n] = next_segment[r]
        position_ids[r, start : start + n] = torch.arange(n)
        next_segment[r] += 1
    return TokenBatch(tokens, labels, loss_mask, segment_ids, position_ids), placements


def shift_left(x: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """``out[..., p] = x[..., p + k]`` along the last dim, ``fill`` past the end."""
    if k == 0:
        return x
    out = torch.full_like(x, fill)
    if k < x.shape[-1]:
        out[..., : x.shape[-1] - k] = x[..., k:]
    return out


def shift_right(x: torch.Tensor, k: int, fill=0) -> torch.Tensor:
    """``out[..., i] = x[..., i - k]`` along the last dim, ``fill`` before the start."""
    if k == 0:
        return x
    out = torch.full_like(x, fill)
    if k < x.shape[-1]:
        out[..., k:] = x[..., : x.shape[-1] - k]
    return out


def mtp_targets(batch: TokenBatch, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets and validity of MTP depth ``depth`` in its own frame (position ``p``).

    Depth ``k`` at position ``p`` predicts ``labels[p + k]``. The alignment rule: the term is
    used only when BOTH ``p`` and ``p + k`` are masked in (``loss_mask``: ``labels[p]`` and
    ``labels[p + k]`` are policy-generated response tokens, not prompt or tool output) and
    ``p + k`` lies in the same packed sequence. These are the drafts speculative decoding makes:
    the main head samples ``labels[p]`` at ``p``, depth ``k`` drafts ``labels[p + k]`` from there;
    a draft from a prompt or tool position, or of a prompt or tool token, is never made.
    """
    if depth < 1:
        raise ValueError(f"MTP depth is 1-based, got {depth}")
    targets = shift_left(batch.labels, depth)
    same_segment = shift_left(batch.segment_ids, depth, fill=-1) == batch.segment_ids
    valid = batch.loss_mask & shift_left(batch.loss_mask, depth, fill=False) & same_segment & (batch.segment_ids > 0)
    return targets, valid


def aligned_mtp_mask(batch: TokenBatch, depth: int) -> torch.Tensor:
    """Validity of depth ``depth`` in the label frame: index ``i`` scores ``labels[i]``."""
    return shift_right(mtp_targets(batch, depth)[1], depth, fill=False)


def supervised_mtp_mask(batch: TokenBatch, depth: int) -> torch.Tensor:
    """Depth ``depth``'s validity for supervised training (the warm start), in the label frame: the target is
    masked in and in the same packed sequence as its source, which may be a prompt position (megatron-core's
    MTP loss masks by the target alone). Supervised MTP learns from every answer token, the first ones
    included, drafted from the prompt; RL keeps :func:`mtp_targets`' rule, the drafts decoding makes."""
    if depth < 1:
        raise ValueError(f"MTP depth is 1-based, got {depth}")
    source_segment = shift_right(batch.segment_ids, depth, fill=-1)
    return batch.loss_mask & (source_segment == batch.segment_ids) & (batch.segment_ids > 0)
