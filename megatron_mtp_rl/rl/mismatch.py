"""Rollout–trainer mismatch: how far the engine's log-probs are from the trainer's θ_old.

The engine samples with its own kernels (and possibly another precision); the trainer's
recomputed θ_old log-probs differ. We measure the gap (mean |Δ log p| and the k3 estimate of
KL(π_rollout ‖ π_old) on the sampled tokens) and can correct the policy gradient with
truncated importance sampling (TIS, as slime and veRL do): each token's policy loss is
weighted by min(π_old/π_rollout, C), a constant (no gradient) — the token level of
``rl/rollout_correction.py``, which also has sequence / geometric levels, rejection and a veto.
"""

from __future__ import annotations

import torch

from megatron_mtp_rl.rl.rollout_correction import truncated_weights

MISMATCH_METRICS = ("rollout/logprob_abs_diff", "rollout/mismatch_kl")


def tis_weights(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, cap: float) -> torch.Tensor:
    """``min(exp(ℓ_old − ℓ_rollout), cap)``, detached, fp32."""
    if cap <= 0:
        raise ValueError(f"--tis-cap must be > 0, got {cap}")
    return truncated_weights(old_logprobs.detach().float() - rollout_logprobs.detach().float(), cap)


@torch.no_grad()
def mismatch_per_token(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-token ``|ℓ_old − ℓ_rollout|`` and k3 = r − 1 − log r with r = π_old/π_rollout.

    k3 is an unbiased, non-negative per-sample estimate of KL(π_rollout ‖ π_old) for tokens
    drawn from π_rollout (Schulman's estimator).
    """
    log_r = old_logprobs.double() - rollout_logprobs.double()
    abs_diff, kl = MISMATCH_METRICS
    return {abs_diff: log_r.abs(), kl: torch.expm1(log_r) - log_r}
