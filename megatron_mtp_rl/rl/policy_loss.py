"""PPO-style clipped surrogates (token ratio or GSPO sequence ratio), KL and aggregation.

Every function works on label-frame tensors ``[B, S]`` of a packed batch plus a
``seq_index`` tensor that numbers each token's sequence (see :func:`sequence_index`), so
sequence-level quantities work with packing. Aggregation divides by *global*
denominators (all micro-batches and data-parallel ranks of the optimizer step), passed
in, so that the gradient does not depend on how the step is split.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_TYPES = ("k1", "k3", "low-var-kl")


def sequence_index(segment_ids: torch.Tensor) -> torch.Tensor:
    """A distinct id per (row, segment); padding gets its own id per row (never masked in)."""
    b, s = segment_ids.shape
    rows = torch.arange(b, device=segment_ids.device)[:, None]
    return rows * (s + 1) + segment_ids


def per_sequence_sum(values: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor):
    """Σ over each sequence's masked tokens; returns (sums, counts) indexed by seq_index."""
    n = int(seq_index.max().item()) + 1 if seq_index.numel() else 1
    m = mask.to(values.dtype)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, seq_index.flatten(), (values * m).flatten())
    counts = torch.zeros(n, dtype=values.dtype, device=values.device)
    counts = counts.index_add(0, seq_index.flatten(), m.flatten())
    return sums, counts


@dataclass(frozen=True)
class Denominators:
    """Global counts for the step: valid tokens and sequences with ≥1 valid token."""

    tokens: float
    sequences: float


def local_denominators(mask: torch.Tensor, seq_index: torch.Tensor) -> Denominators:
    _, counts = per_sequence_sum(torch.ones_like(mask, dtype=torch.float32), mask, seq_index)
    return Denominators(tokens=float(mask.sum()), sequences=float((counts > 0).sum()))


def aggregate(
    loss: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    mode: str,
    denom: Denominators,
) -> torch.Tensor:
    """Reduce per-token ``loss`` to this micro-batch's share of the step's loss."""
    if mode == "token-mean":
        return (loss * mask).sum() / max(denom.tokens, 1.0)
    sums, counts = per_sequence_sum(loss, mask, seq_index)
    if mode == "seq-mean-token-sum":
        return sums.sum() / max(denom.sequences, 1.0)
    if mode == "seq-mean-token-mean":
        return (sums / counts.clamp(min=1)).sum() / max(denom.sequences, 1.0)
    raise ValueError(f"unknown loss aggregation {mode!r}; choose one of {AGG_MODES}")


def log_ratio(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
    ratio_type: str = "token",
) -> torch.Tensor:
    """Per-token log importance ratio.

    ``token``: log π/π_old per token (PPO/GRPO/DAPO). ``sequence`` (GSPO): every token
    carries its sequence's length-normalised log ratio, with the gradient of its own token
    (``sg[s_i] · π(y_t) / sg[π(y_t)]``).
    """
    lr = logprobs - old_logprobs
    if ratio_type == "token":
        return lr
    if ratio_type != "sequence":
        raise ValueError(f"unknown ratio type {ratio_type!r}; choose 'token' or 'sequence'")
    sums, counts = per_sequence_sum(lr.detach(), mask, seq_index)
    seq_mean = (sums / counts.clamp(min=1))[seq_index]
    return seq_mean + logprobs - logprobs.detach()


@dataclass
class SurrogateOut:
    loss: torch.Tensor  # [B, S] per-token loss (to be aggregated)
    clipped: torch.Tensor  # [B, S] bool: the clipped branch was taken
    ratio: torch.Tensor  # [B, S] importance ratio (detached)


def clipped_surrogate(
    log_ratio_: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_clip: float,
    eps_clip_high: float | None = None,
    eps_clip_c: float | None = None,
) -> SurrogateOut:
    """PPO clip with clip-higher (DAPO) and dual-clip (``eps_clip_c`` > 1, negative A only).

    loss = -min(r·A, clip(r, 1-ε, 1+ε_high)·A); for A < 0 additionally bounded by -c·A.
    """
    hi = eps_clip if eps_clip_high is None else eps_clip_high
    ratio = torch.exp(log_ratio_.clamp(max=20.0))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_clip, 1.0 + hi)
    loss = torch.maximum(unclipped, clipped)
    took_clip = clipped > unclipped
    if eps_clip_c is not None:
        if eps_clip_c <= 1.0:
            raise ValueError(f"--eps-clip-c must be > 1 (dual-clip), got {eps_clip_c}")
        bound = -advantages * eps_clip_c
        dual = torch.minimum(loss, bound)
        loss = torch.where(advantages < 0, dual, loss)
    return SurrogateOut(loss=loss, clipped=took_clip, ratio=ratio.detach())


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimators: k1, k3 (Schulman), low-var-kl (k3 clamped to ±10)."""
    diff = ref_logprobs - logprobs
    if kl_type == "k1":
        return -diff
    if kl_type in ("k3", "low-var-kl"):
        k3 = torch.exp(diff) - diff - 1.0
        return k3.clamp(-10.0, 10.0) if kl_type == "low-var-kl" else k3
    raise ValueError(f"unknown KL type {kl_type!r}; choose one of {KL_TYPES}")
