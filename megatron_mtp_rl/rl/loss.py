"""The RL loss of one micro-batch: policy surrogate + KL + entropy + Σ_k c_k · L_k (MTP).

``RLLoss`` is the ``loss_fn`` handed to the training schedule. It returns the
micro-batch's share of the step loss (normalised by global denominators) and metrics as
``rl/metric_values.py`` vectors: a mean's step value is Σsum/Σcount over micro-batches and DP
ranks (absent when nothing was counted), a share of the step loss is Σsum.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from megatron_mtp_rl.config import AlgoConfig, MTPConfig
from megatron_mtp_rl.models.batch import TokenBatch, aligned_mtp_mask
from megatron_mtp_rl.models.mtp_forward import HeadLogProbs
from megatron_mtp_rl.platform.device import collective_device
from megatron_mtp_rl.rl.head_loss import check_head_loss, head_loss_terms
from megatron_mtp_rl.rl.metric_values import averaged, masked_mean, summed
from megatron_mtp_rl.rl.mismatch import MISMATCH_METRICS, mismatch_per_token
from megatron_mtp_rl.rl.occ import OCCEstimator, occ_statistics
from megatron_mtp_rl.rl.policy_loss import (
    AGG_MODES,
    KL_TYPES,
    Denominators,
    aggregate,
    clipped_surrogate,
    kl_penalty,
    local_denominators,
    log_ratio,
    sequence_index,
)
from megatron_mtp_rl.rl.regimes import Regime, get_regime
from megatron_mtp_rl.rl.rollout_correction import RolloutCorrection, rollout_correction


@dataclass
class RLBatch(TokenBatch):
    """A packed micro-batch with what the RL loss needs, all in the label frame."""

    advantages: torch.Tensor | None = None  # [B, S]
    old_logprobs: torch.Tensor | None = None  # [B, S]
    old_mtp_logprobs: torch.Tensor | None = None  # [D, B, S]
    ref_logprobs: torch.Tensor | None = None  # [B, S]
    rollout_logprobs: torch.Tensor | None = None  # [B, S] the engine's log-probs (mismatch, TIS)
    values: torch.Tensor | None = None  # [B, S] V_old: the critic's values before its update (gae)
    returns: torch.Tensor | None = None  # [B, S] GAE returns, the critic's targets (gae)
    teacher_logprobs: torch.Tensor | None = None  # [B, S] a distillation teacher's (--advantage-estimator opd)
    # MoE routes [B, S, MoE layers, topk] int16 by input token, −1 unknown (models/routing_replay.py):
    # the engine's (R3, agreement) and the old pass's (R2)
    routes: torch.Tensor | None = None
    r2_routes: torch.Tensor | None = None

    def to(self, device) -> RLBatch:
        return RLBatch(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})


@dataclass(frozen=True)
class RLLossConfig:
    """Loss flags (``--eps-clip`` ..., ``--mtp-regime``, ``--mtp-loss-coef``)."""

    # Defaults are the flags' (config.py; built from a RunConfig by train/builders.py:build_loss).
    eps_clip: float = AlgoConfig.eps_clip
    eps_clip_high: float | None = AlgoConfig.eps_clip_high
    eps_clip_c: float | None = AlgoConfig.eps_clip_c
    loss_agg_mode: str = AlgoConfig.loss_agg_mode
    ratio_type: str = AlgoConfig.ratio_type  # "sequence" = GSPO
    kl_coef: float = AlgoConfig.kl_coef
    kl_type: str = AlgoConfig.kl_type
    entropy_coef: float = AlgoConfig.entropy_coef
    mtp_regime: str = MTPConfig.mtp_regime
    mtp_loss_coef: float = MTPConfig.mtp_loss_coef

    # MTP-head objective beside the regime (rl/head_loss.py) and rollout corrections
    # (rl/rollout_correction.py; ``tis_cap=C`` is token-level IS capped at C).
    mtp_head_loss: str = "none"
    mtp_head_coef: float = 0.1
    tis_cap: float | None = None
    correction: RolloutCorrection = field(default_factory=RolloutCorrection)

    def __post_init__(self):
        get_regime(self.mtp_regime)
        check_head_loss(self.mtp_head_loss)
        if self.tis_cap is not None:
            c = self.correction
            if c.is_level not in ("none", "token") or c.is_cap not in (None, self.tis_cap):
                raise ValueError("--tis-cap C is --rollout-is token --rollout-is-cap C: give one or the other")
            object.__setattr__(
                self, "correction", RolloutCorrection(**{**c.__dict__, "is_level": "token", "is_cap": self.tis_cap})
            )
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"--loss-agg-mode must be one of {AGG_MODES}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"--kl-type must be one of {KL_TYPES}")
        if self.ratio_type not in ("token", "sequence"):
            raise ValueError("--ratio-type must be 'token' or 'sequence' (GSPO)")

    @property
    def regime(self) -> Regime:
        return get_regime(self.mtp_regime)

    @property
    def runs_mtp(self) -> bool:
        """The MTP block runs in the training forward (for the regime or for the head objective)."""
        return self.regime.runs_mtp or self.mtp_head_loss != "none"


@dataclass
class StepDenominators:
    """Global token / sequence counts of one optimizer step: main head and each depth."""

    main: Denominators
    mtp: list[Denominators] = field(default_factory=list)


def step_denominators(
    batches: list[TokenBatch], num_depths: int, group=None, mtp_mask: Callable = aligned_mtp_mask
) -> StepDenominators:
    """Count valid tokens and sequences over this rank's micro-batches, all-reduced over DP. ``mtp_mask(batch,
    k)``: depth k's valid positions in the label frame (the warm start counts the supervised ones)."""
    rows = []
    for k in range(num_depths + 1):
        tok = seq = 0.0
        for b in batches:
            mask = b.loss_mask if k == 0 else mtp_mask(b, k)
            d = local_denominators(mask, sequence_index(b.segment_ids))
            tok += d.tokens
            seq += d.sequences
        rows.append([tok, seq])
    t = torch.tensor(rows, dtype=torch.float64, device=collective_device(group))
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    dens = [Denominators(tokens=float(r[0]), sequences=float(r[1])) for r in t]
    return StepDenominators(main=dens[0], mtp=dens[1:])


class RLLoss:
    """Callable ``(batch, HeadLogProbs) -> (loss, metrics)`` for one micro-batch."""

    def __init__(
        self,
        config: RLLossConfig,
        denominators: StepDenominators,
        occ: OCCEstimator | None = None,
        mtp_coef_override: list[float] | None = None,
    ):
        self.config = config
        self.regime = config.regime
        self.den = denominators
        self.occ = occ
        self.mtp_coef_override = mtp_coef_override  # tests: force λ

    def forward_kwargs(self) -> dict:
        """How the schedule must run the model for this loss."""
        head = self.config.mtp_head_loss
        return {
            "with_mtp": self.config.runs_mtp,
            # a head objective alone (regime none) needs only the detached MTP pass
            "detach_mtp": self.regime.detach or not self.regime.runs_mtp,
            "with_entropy": self.config.entropy_coef > 0,
            "with_draft_stats": self.config.runs_mtp,
            **({"mtp_head": head} if head != "none" else {}),
        }

    def _surrogate(self, logprobs, old_logprobs, advantages, mask, seq_index):
        """The clipped surrogate with this config's ratio and clips (main head and MTP depths)."""
        cfg = self.config
        lr = log_ratio(logprobs, old_logprobs, mask, seq_index, cfg.ratio_type)
        return clipped_surrogate(
            lr, advantages, eps_clip=cfg.eps_clip, eps_clip_high=cfg.eps_clip_high, eps_clip_c=cfg.eps_clip_c
        )

    def __call__(self, batch: RLBatch, out: HeadLogProbs):
        cfg = self.config
        seq_index = sequence_index(batch.segment_ids)
        mask = batch.loss_mask
        agg = cfg.loss_agg_mode
        metrics: dict[str, torch.Tensor] = {}

        sur = self._surrogate(out.logprobs, batch.old_logprobs, batch.advantages, mask, seq_index)
        pg_tokens = sur.loss
        # Always present (same keys on every micro-batch and DP rank); nothing counted when the
        # engine returned no log-probs, and then the metric is absent from the step's row.
        for name in MISMATCH_METRICS:
            metrics[name] = averaged(0.0, 0.0)
        if batch.rollout_logprobs is not None:
            for name, v in mismatch_per_token(batch.old_logprobs, batch.rollout_logprobs).items():
                metrics[name] = masked_mean(v, mask)
        if cfg.correction.active:
            if batch.rollout_logprobs is None:
                raise ValueError(
                    "the rollout corrections (--rollout-is/-rs/-veto-threshold, --tis-cap) need the "
                    "rollout engine's log-probs in the batch"
                )
            corr = rollout_correction(cfg.correction, batch.old_logprobs, batch.rollout_logprobs, mask, seq_index)
            pg_tokens = pg_tokens * corr.weights * corr.keep
            metrics.update(corr.metrics)
            if cfg.tis_cap is not None:
                metrics["train/tis_weight"] = masked_mean(corr.weights, mask)
        pg = aggregate(pg_tokens, mask, seq_index, agg, self.den.main)
        loss = pg
        metrics["train/policy_loss"] = summed(pg.detach())
        metrics["train/clipfrac"] = masked_mean(sur.clipped.double(), mask)
        metrics["train/ratio"] = masked_mean(sur.ratio, mask)
        metrics["train/logprob"] = masked_mean(out.logprobs, mask)
        if cfg.kl_coef > 0:
            if batch.ref_logprobs is None:
                raise ValueError("--kl-coef > 0 needs reference log-probs in the batch")
            kl = kl_penalty(out.logprobs, batch.ref_logprobs, cfg.kl_type)
            loss = loss + cfg.kl_coef * aggregate(kl, mask, seq_index, agg, self.den.main)
            metrics["train/kl"] = masked_mean(kl, mask)
        if out.entropy is not None:
            metrics["train/entropy"] = masked_mean(out.entropy, mask)
            if cfg.entropy_coef > 0:
                ent = aggregate(out.entropy, mask, seq_index, agg, self.den.main)
                loss = loss - cfg.entropy_coef * ent

        if self.regime.runs_mtp and out.num_depths:
            loss = loss + self._mtp_terms(batch, out, seq_index, metrics)
        elif out.num_depths:
            self._mtp_metrics(out, metrics)
        if cfg.mtp_head_loss != "none" and out.num_depths:
            loss = loss + head_loss_terms(
                out, cfg.mtp_head_loss, cfg.mtp_head_coef, seq_index, agg, self.den.mtp, metrics
            )
        metrics["train/loss"] = summed(loss.detach())
        return loss, metrics

    def _mtp_terms(self, batch, out, seq_index, metrics) -> torch.Tensor:
        cfg = self.config
        num_depths = out.num_depths
        stats = None
        if self.occ is not None:
            baselines = [None] * num_depths
            if self.occ.config.baseline == "mtp_old":
                if batch.old_mtp_logprobs is None:
                    raise ValueError("--occ-baseline mtp_old needs old MTP log-probs")
                baselines = list(batch.old_mtp_logprobs)
            stats = torch.stack(
                [
                    occ_statistics(
                        out.logprobs,
                        batch.old_logprobs,
                        out.mtp_logprobs[k],
                        out.mtp_mask[k],
                        baselines[k],
                    )
                    for k in range(num_depths)
                ]
            )
            self.occ.accumulate(stats)
        if self.mtp_coef_override is not None:
            coefs = list(self.mtp_coef_override)
        elif self.regime.adaptive:
            coefs = self.occ.coefficients_for(stats)
        else:
            coefs = [cfg.mtp_loss_coef] * num_depths

        total = out.logprobs.new_zeros(())
        for k in range(num_depths):
            m = out.mtp_mask[k]
            lp = out.mtp_logprobs[k]
            den = self.den.mtp[k]
            if self.regime.objective == "ce":
                term = aggregate(-lp, m, seq_index, cfg.loss_agg_mode, den)
            else:
                if batch.old_mtp_logprobs is None:
                    raise ValueError(f"--mtp-regime {self.regime.name} needs old MTP log-probs")
                sur_k = self._surrogate(lp, batch.old_mtp_logprobs[k], batch.advantages, m, seq_index)
                term = aggregate(sur_k.loss, m, seq_index, cfg.loss_agg_mode, den)
            total = total + coefs[k] * term
            metrics[f"mtp/loss_{k + 1}"] = summed(term.detach())
            metrics[f"mtp/coef_{k + 1}"] = averaged(coefs[k], 1)
        self._mtp_metrics(out, metrics)
        return total

    @staticmethod
    def _mtp_metrics(out, metrics) -> None:
        """Per-depth MTP log-prob, expected draft acceptance and top-1 agreement."""
        for k in range(out.num_depths):
            m, d = out.mtp_mask[k], k + 1
            metrics[f"mtp/logprob_{d}"] = masked_mean(out.mtp_logprobs[k], m)
            if out.mtp_accept is not None:
                metrics[f"mtp/accept_{d}"] = masked_mean(out.mtp_accept[k], m)
                metrics[f"mtp/top1_agree_{d}"] = masked_mean(out.mtp_top1[k], m)
