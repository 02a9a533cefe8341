"""Optimal Coefficient Calibration (OCC): the per-depth MTP coefficient λ_k.

Per MTP depth k and valid response token i (mask m_i), with ℓ the current main log-prob,
ℓ_old the old main log-prob (recomputed before the update), ℓ^k the current depth-k MTP
log-prob of the same token and b the baseline (ℓ_old by default, or the MTP head's own old
log-prob):

    d_i = ℓ_i − ℓ_old_i          (log-prob change: proxy of the RL gradient direction)
    e_i = ℓ^k_i − b_i            (proxy of the MTP gradient direction)
    S_A = Σ m d e,  S_V = Σ m e²,  N = Σ m      over every DP(×CP) rank's tokens
    A = S_A/N,  V = S_V/N,  λ*_k = clamp((ρ/D) · A/(V + ε), λ_min, λ_max)

The sums of all micro-batches of one optimizer step are all-reduced once (a ``[D, 4]``
tensor: S_A, S_V, N and the count of tokens with d ≠ 0) right before ``optimizer.step()``;
the λ so obtained is used from the next mini-batch on, because the loss of a micro-batch
must exist before its backward. ``reduce="local"`` reproduces the paper's public code
instead: λ from each micro-batch alone, used for that micro-batch, no communication.

λ changes only on *informative* statistics. A mini-batch run with θ = θ_old (the first of
every rollout batch) has every d exactly 0: A = 0 there says nothing about alignment, so
such a step — or one with N = 0, S_V = 0 or a non-finite value — keeps the previous λ and
counts a skipped update. The d ≠ 0 count is the 4th column of the same all-reduce, so the
decision is global and identical on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mtp_rl.config import MTPConfig
from megatron_mtp_rl.platform.device import collective_device

BASELINES = ("main_old", "mtp_old")
REDUCE_MODES = ("global", "local")


@torch.no_grad()
def occ_statistics(
    main_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    mtp_logprobs: torch.Tensor,
    mask: torch.Tensor,
    baseline: torch.Tensor | None = None,
) -> torch.Tensor:
    """``(Σ m·d·e, Σ m·e², Σ m, Σ m·[d ≠ 0])`` for one depth, fp64; ``baseline`` defaults to ``old_logprobs``.

    ``mask`` may be bool or 0/1 of any shape matching the log-prob tensors. Masked
    positions contribute nothing, even when their log-probs are not finite. The last
    column tells a θ = θ_old mini-batch (every d exactly 0) from a measured zero alignment.
    """
    m = mask.bool()
    b = old_logprobs if baseline is None else baseline
    d = (main_logprobs.double() - old_logprobs.double())[m]
    e = (mtp_logprobs.double() - b.double())[m]
    n = torch.tensor(float(m.sum()), dtype=torch.float64, device=d.device)
    return torch.stack([(d * e).sum(), (e * e).sum(), n, (d != 0).sum().to(torch.float64)])


class Uninformative(ValueError):
    """Statistics that say nothing about alignment: λ keeps its previous value."""


def occ_coefficient(
    stats: torch.Tensor,
    *,
    ratio: float,
    num_depths: int,
    eps: float = 1e-8,
    lo: float = 0.0,
    hi: float = 1.0,
) -> float:
    """``clamp((ratio/num_depths) · A/(V + eps), lo, hi)`` with A, V the token means.

    ``stats``: ``(S_A, S_V, N)`` or ``(S_A, S_V, N, #[d ≠ 0])``. Raises :class:`Uninformative`
    (a ``ValueError``) when the statistics hold no token, every d is exactly 0 (θ = θ_old),
    S_V = 0, or a value is not finite: the caller (the estimator) keeps its previous λ then.
    """
    vals = [float(x) for x in stats]
    s_a, s_v, n = vals[:3]
    if not all(math.isfinite(x) for x in vals):
        raise Uninformative(f"non-finite statistics (S_A={s_a}, S_V={s_v}, N={n})")
    if n <= 0:
        raise Uninformative("no valid token")
    if len(vals) > 3 and vals[3] == 0:
        raise Uninformative("every d = ℓ − ℓ_old is exactly 0 (θ = θ_old)")
    if s_v == 0:
        raise Uninformative("S_V = 0 (the MTP log-probs equal the baseline)")
    a, v = s_a / n, s_v / n
    lam = (ratio / num_depths) * a / (v + eps)
    if not math.isfinite(lam):
        raise Uninformative(f"non-finite coefficient (A={a}, V={v})")
    return min(max(lam, lo), hi)


@dataclass(frozen=True)
class OCCConfig:
    """The ``--occ-*`` flags."""

    # Defaults are the flags' (config.py MTPConfig; built from a RunConfig by train/builders.py:build_occ).
    ratio: float = MTPConfig.occ_ratio
    eps: float = MTPConfig.occ_eps
    lo: float = MTPConfig.occ_min
    hi: float = MTPConfig.occ_max
    ema: float = MTPConfig.occ_ema
    init: float | None = MTPConfig.occ_init  # None: ρ/D
    baseline: str = MTPConfig.occ_baseline
    reduce: str = MTPConfig.occ_reduce

    def __post_init__(self):
        if self.baseline not in BASELINES:
            raise ValueError(f"--occ-baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.reduce not in REDUCE_MODES:
            raise ValueError(f"--occ-reduce must be one of {REDUCE_MODES}, got {self.reduce!r}")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"--occ-ema must be in [0, 1), got {self.ema}")
        if self.lo > self.hi:
            raise ValueError(f"--occ-min {self.lo} is larger than --occ-max {self.hi}")


class OCCEstimator:
    """Holds λ_k per depth, accumulates the statistics of one optimizer step and reduces them.

    ``accumulate`` is called per micro-batch (by the loss), ``reduce`` once per optimizer
    step (from megatron's ``finalize_model_grads_func``) on every rank of the DP(×CP)
    group: one ``all_reduce(SUM)`` of the ``[D, 4]`` statistics. λ_k changes only when the
    statistics are informative (see :func:`occ_coefficient`); otherwise it keeps its last
    value and ``skipped_updates`` counts the step.
    """

    NUM_STATS = 4

    def __init__(self, num_depths: int, config: OCCConfig | None = None, group=None):
        if num_depths < 1:
            raise ValueError("OCC needs at least one MTP layer (--mtp-num-layers ≥ 1)")
        self.config = config or OCCConfig()
        self.num_depths = num_depths
        self.group = group
        init = self.config.init if self.config.init is not None else self.config.ratio / num_depths
        self.lambdas = [float(init)] * num_depths
        self.guard_events = 0  # N = 0 or non-finite statistics (a subset of the skipped updates)
        self.skipped_updates = 0  # (step or local micro-batch) × depth updates that kept λ
        self.reduce_calls = 0
        self.last: dict[str, float] = {}
        self._stats = torch.zeros(num_depths, self.NUM_STATS, dtype=torch.float64)

    # -- per micro-batch -------------------------------------------------------------
    def accumulate(self, depth_stats: torch.Tensor) -> None:
        """Add one micro-batch's ``[D, 4]`` statistics to this step's running sums."""
        self._stats += depth_stats.detach().to(torch.float64).cpu()

    def coefficients_for(self, depth_stats: torch.Tensor) -> list[float]:
        """λ to use for a micro-batch: the lagged global λ, or (``local``) its own λ.

        In ``local`` mode an informative micro-batch updates λ and uses it; an uninformative
        one (θ = θ_old, no token) uses the last informative λ.
        """
        if self.config.reduce == "global":
            return list(self.lambdas)
        for k in range(self.num_depths):
            self._update(k, depth_stats[k])
        return list(self.lambdas)

    # -- per optimizer step ------------------------------------------------------------
    def reduce(self) -> dict[str, float]:
        """All-reduce this step's statistics, update λ (global mode), return the step's OCC metrics."""
        stats = self._stats.clone()
        if self.config.reduce == "global" and dist.is_initialized():
            if dist.get_world_size(self.group) > 1:
                # NCCL reduces CUDA tensors only; the sums are kept (and used) on the CPU.
                on_wire = stats.to(collective_device(self.group))
                dist.all_reduce(on_wire, op=dist.ReduceOp.SUM, group=self.group)
                stats = on_wire.cpu()
            self.reduce_calls += 1
        self._stats.zero_()
        metrics: dict[str, float] = {"occ/tokens": float(stats[0, 2])}
        for k in range(self.num_depths):
            s_a, s_v, n = (float(x) for x in stats[k, :3])
            a = s_a / n if n > 0 else float("nan")
            v = s_v / n if n > 0 else float("nan")
            if self.config.reduce == "global":
                self._update(k, stats[k])
            metrics[f"occ/alignment_{k + 1}"] = a
            metrics[f"occ/variance_{k + 1}"] = v
            metrics[f"occ/lambda_{k + 1}"] = self.lambdas[k]
        metrics["occ/guard_events"] = float(self.guard_events)
        metrics["occ/skipped_updates"] = float(self.skipped_updates)
        self.last = metrics
        return metrics

    def _update(self, k: int, stats: torch.Tensor) -> None:
        """λ_k ← (EMA of) λ*_k from informative statistics; otherwise keep λ_k and count the skip."""
        c = self.config
        try:
            new = occ_coefficient(stats, ratio=c.ratio, num_depths=self.num_depths, eps=c.eps, lo=c.lo, hi=c.hi)
        except Uninformative:
            self.skipped_updates += 1
            vals = [float(x) for x in stats[:3]]
            if vals[2] <= 0 or not all(math.isfinite(x) for x in vals):
                self.guard_events += 1
            return
        beta = c.ema
        self.lambdas[k] = beta * self.lambdas[k] + (1.0 - beta) * new if beta else new

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "lambdas": list(self.lambdas),
            "guard_events": self.guard_events,
            "skipped_updates": self.skipped_updates,
        }

    def load_state_dict(self, state: dict) -> None:
        if len(state["lambdas"]) != self.num_depths:
            raise ValueError(
                f"checkpoint has OCC state for {len(state['lambdas'])} MTP depths, the model has {self.num_depths}"
            )
        self.lambdas = [float(x) for x in state["lambdas"]]
        self.guard_events = int(state["guard_events"])
        self.skipped_updates = int(state.get("skipped_updates", 0))


def zero_alignment_warning(*, regime: str, reduce: str, minibatches_per_rollout: int, epochs: int = 1) -> str | None:
    """The start-up warning for configurations in which OCC's d ≡ 0.

    d = ℓ − ℓ_old is zero whenever the optimizer step runs with θ = θ_old, which is every
    step when each rollout batch is consumed by a single optimizer step. Such statistics
    are uninformative, so λ never leaves --occ-init: OCC silently becomes ``policy``.
    """
    if regime != "occ" or minibatches_per_rollout * epochs > 1:
        return None
    where = "mini-batch" if reduce == "global" else "micro-batch"
    return (
        "OCC: each rollout batch is used for exactly one optimizer step "
        "(--global-batch-size equals --rollout-batch-size × --n-samples-per-prompt), so every "
        "step runs with θ = θ_old and the alignment proxy d = ℓ − ℓ_old is identically 0: "
        f"no {where} is informative, λ is never updated and stays at --occ-init for the whole run "
        "(OCC trains like --mtp-regime policy with that coefficient; occ/skipped_updates counts every step). "
        "Use a smaller --global-batch-size (several mini-batches per rollout batch)."
    )
