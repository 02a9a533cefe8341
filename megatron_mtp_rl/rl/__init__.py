"""RL algorithms: advantages, policy losses, MTP regimes and OCC. Never imports rollout/."""

from megatron_mtp_rl.rl.advantages import (
    dynamic_sampling_mask,
    grpo_advantages,
    overlong_penalty,
)
from megatron_mtp_rl.rl.loss import RLBatch, RLLoss, RLLossConfig, step_denominators
from megatron_mtp_rl.rl.occ import (
    OCCConfig,
    OCCEstimator,
    occ_coefficient,
    occ_statistics,
    zero_alignment_warning,
)
from megatron_mtp_rl.rl.regimes import REGIMES, get_regime

__all__ = [
    "REGIMES",
    "OCCConfig",
    "OCCEstimator",
    "RLBatch",
    "RLLoss",
    "RLLossConfig",
    "dynamic_sampling_mask",
    "get_regime",
    "grpo_advantages",
    "occ_coefficient",
    "occ_statistics",
    "overlong_penalty",
    "step_denominators",
    "zero_alignment_warning",
]
