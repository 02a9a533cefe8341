"""Rollout corrections: importance weights, rejection masks and a veto against the engine's log-probs.

The engine samples from π_rollout (its kernels, its precision, its experts), the loss assumes
π_old. Per token ``log r = ℓ_old − ℓ_rollout``; at three levels:

- ``token``: r of each token;
- ``sequence``: ∏ r over the sequence's loss tokens (exp Σ log r), on each of its tokens;
- ``geometric``: the geometric mean (exp mean log r), on each of its tokens.

``--rollout-is LEVEL`` weights each token's policy loss by min(r_level, C) (truncated IS, a
constant: no gradient); ``--rollout-rs LEVEL`` drops tokens (token level) or whole sequences
whose r_level is outside [LOW, HIGH]; ``--rollout-veto-threshold T`` drops every sequence with
a token ratio below T (a catastrophic token the engine sampled that the trainer finds nearly
impossible). Both act per token before aggregation, with the loss mask: a dropped token's
policy loss is 0 and the step's denominators are unchanged (like weight 0), so the gradient
scale does not depend on how many were dropped. ``--tis-cap C`` is ``token`` IS with cap C.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mtp_rl.rl.metric_values import masked_mean, maximum
from megatron_mtp_rl.rl.policy_loss import per_sequence_sum

LEVELS = ("none", "token", "sequence", "geometric")
METRICS = (
    "rollout_correction/is_weight_mean",
    "rollout_correction/is_weight_max",
    "rollout_correction/rs_masked_fraction",
    "rollout_correction/veto_fraction",
)
_MAX_LOG = 20.0  # exp(20) ≈ 5·10⁸: an overflow guard, far above any sensible cap


@dataclass(frozen=True)
class RolloutCorrection:
    """The flags (``--rollout-is``, ``--rollout-is-cap``, ``--rollout-rs``, ``--rollout-rs-bounds``,
    ``--rollout-veto-threshold``)."""

    is_level: str = "none"
    is_cap: float | None = None
    rs_level: str = "none"
    rs_bounds: tuple[float, float] | None = None
    veto_threshold: float | None = None

    def __post_init__(self):
        if self.is_level not in LEVELS or self.rs_level not in LEVELS:
            raise ValueError(f"--rollout-is / --rollout-rs must be one of {LEVELS}")
        if self.is_cap is not None and self.is_cap <= 0:
            raise ValueError(f"--rollout-is-cap must be > 0, got {self.is_cap}")
        if self.is_level != "none" and self.is_cap is None:
            raise ValueError("--rollout-is needs --rollout-is-cap (truncated importance sampling)")
        if self.rs_level != "none":
            if self.rs_bounds is None:
                raise ValueError("--rollout-rs needs --rollout-rs-bounds LOW,HIGH")
            lo, hi = self.rs_bounds
            if not 0 <= lo < hi:
                raise ValueError(f"--rollout-rs-bounds needs 0 <= LOW < HIGH, got {lo},{hi}")
        if self.veto_threshold is not None and self.veto_threshold <= 0:
            raise ValueError(f"--rollout-veto-threshold must be > 0, got {self.veto_threshold}")

    @property
    def active(self) -> bool:
        return self.is_level != "none" or self.rs_level != "none" or self.veto_threshold is not None

    @classmethod
    def from_flags(
        cls,
        rollout_is: str = "none",
        rollout_is_cap: float | None = None,
        rollout_rs: str = "none",
        rollout_rs_bounds: str | None = None,
        rollout_veto_threshold: float | None = None,
        tis_cap: float | None = None,
    ) -> RolloutCorrection:
        """``--tis-cap C`` means ``--rollout-is token --rollout-is-cap C``."""
        if tis_cap is not None:
            if rollout_is not in ("none", "token") or (rollout_is_cap not in (None, tis_cap)):
                raise ValueError("--tis-cap C is --rollout-is token --rollout-is-cap C: give one or the other")
            rollout_is, rollout_is_cap = "token", tis_cap
        return cls(
            is_level=rollout_is,
            is_cap=rollout_is_cap,
            rs_level=rollout_rs,
            rs_bounds=parse_bounds(rollout_rs_bounds) if rollout_rs_bounds is not None else None,
            veto_threshold=rollout_veto_threshold,
        )


def parse_bounds(text: str) -> tuple[float, float]:
    """``"LOW,HIGH"`` → (LOW, HIGH)."""
    try:
        lo, hi = (float(x) for x in str(text).split(","))
    except ValueError:
        raise ValueError(f"--rollout-rs-bounds must be LOW,HIGH (two numbers), got {text!r}") from None
    return lo, hi


def truncated_weights(log_ratio: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(exp(log r), cap)``, detached (the one truncation every IS level and ``--tis-cap`` use)."""
    return log_ratio.detach().clamp(max=_MAX_LOG).exp().clamp(max=cap)


def level_log_ratio(log_r: torch.Tensor, mask: torch.Tensor, seq_index: torch.Tensor, level: str) -> torch.Tensor:
    """Per token, the log ratio at ``level`` (a sequence's value on each of its tokens)."""
    if level == "token":
        return log_r
    sums, counts = per_sequence_sum(log_r, mask, seq_index)
    if level == "sequence":
        return sums[seq_index]
    if level == "geometric":
        return (sums / counts.clamp(min=1))[seq_index]
    raise ValueError(f"unknown level {level!r}; choose one of {LEVELS}")


@dataclass
class CorrectionOut:
    weights: torch.Tensor  # [B, S] fp32, detached: multiply each token's policy loss
    keep: torch.Tensor  # [B, S] bool: tokens the rejection and the veto keep
    metrics: dict[str, torch.Tensor]


@torch.no_grad()
def rollout_correction(
    cfg: RolloutCorrection,
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    seq_index: torch.Tensor,
) -> CorrectionOut:
    """Weights and keep-mask of one micro-batch's loss tokens, and their metrics (over ``mask``)."""
    mask = mask.bool()
    log_r = (old_logprobs.detach().double() - rollout_logprobs.detach().double()) * mask
    weights = torch.ones_like(log_r)
    keep = mask.clone()
    metrics: dict[str, torch.Tensor] = {}
    if cfg.is_level != "none":
        weights = truncated_weights(level_log_ratio(log_r, mask, seq_index, cfg.is_level), cfg.is_cap)
    if cfg.rs_level != "none":
        lo, hi = cfg.rs_bounds
        r = level_log_ratio(log_r, mask, seq_index, cfg.rs_level).clamp(max=_MAX_LOG).exp()
        rejected = mask & ((r < lo) | (r > hi))
        keep &= ~rejected
        metrics[METRICS[2]] = masked_mean(rejected.double(), mask)
    if cfg.veto_threshold is not None:
        bad = (mask & (log_r < torch.log(torch.tensor(cfg.veto_threshold, dtype=log_r.dtype)))).double()
        bad_seq, _ = per_sequence_sum(bad, mask, seq_index)
        vetoed = mask & (bad_seq[seq_index] > 0)
        keep &= ~vetoed
        metrics[METRICS[3]] = masked_mean(vetoed.double(), mask)
    if cfg.is_level != "none":
        metrics[METRICS[0]] = masked_mean(weights, keep)
        metrics[METRICS[1]] = maximum(weights[keep].max() if keep.any() else None)
    return CorrectionOut(weights=weights.float(), keep=keep, metrics=metrics)
