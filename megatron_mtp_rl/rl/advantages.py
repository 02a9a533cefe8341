"""Advantage estimators (``--advantage-estimator``), dynamic sampling and overlong shaping.

Rewards arrive as a flat tensor ordered group by group: ``n`` samples of prompt 0, then
``n`` samples of prompt 1, ... (``n = --n-samples-per-prompt``).

An estimator (:class:`Estimator`) reads :class:`AdvantageInputs` and returns either one
advantage per sample (``[N]``, given to every trained token of the sample's response) or one
per response token (``[N, T]``, the response frame: row ``i`` is sample ``i``'s response, right
padded to the longest). It runs after the old / reference log-probs (and critic values) are
computed, so token-level estimators can read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_mtp_rl.platform.device import collective_device
from megatron_mtp_rl.rl.policy_loss import kl_penalty


@dataclass
class AdvantageInputs:
    """What an estimator may read for this DP rank's samples; token tensors are ``[N, T]``, on the CPU."""

    rewards: torch.Tensor  # [N] shaped rewards, grouped (n consecutive samples share a prompt)
    group_size: int
    algo: Any  # cfg.algo (config.AlgoConfig)
    mask: torch.Tensor  # [N, T] bool: tokens that are trained (policy tokens; not tool output, not padding)
    old_logprobs: torch.Tensor | None = None  # [N, T] θ_old's log-probs of the response tokens
    ref_logprobs: torch.Tensor | None = None  # [N, T] the KL reference's (--kl-coef > 0)
    values: torch.Tensor | None = None  # [N, T] a critic's value estimates, when the run has one
    teacher_logprobs: torch.Tensor | None = None  # [N, T] a distillation teacher's, when the run has one
    dp_group: Any = None  # the data-parallel group a global (whole-batch) statistic reduces over


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: ``fn(inputs) -> [N]`` (per sample) or ``[N, T]`` (per response token).

    ``needs`` names the :class:`AdvantageInputs` scores it cannot do without (``old_logprobs``,
    ``ref_logprobs``, ``values``, ``teacher_logprobs``): the run checks they are there.
    """

    fn: Callable[[AdvantageInputs], torch.Tensor]
    needs: tuple[str, ...] = ()
    kl_in_reward: bool = False  # --kl-coef goes into the token rewards, not into the loss

    def __call__(self, inputs: AdvantageInputs) -> torch.Tensor:
        return self.fn(inputs)


def token_advantages(adv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An estimator's output as ``[N, T]`` float32, zero on untrained tokens (per-sample values broadcast)."""
    n, t = mask.shape
    if adv.dim() == 1 and adv.shape[0] == n:
        adv = adv[:, None].expand(n, t)
    elif adv.shape != (n, t):
        raise ValueError(f"an advantage estimator must return shape ({n},) or ({n}, {t}), got {tuple(adv.shape)}")
    return torch.where(mask.bool(), adv.float(), torch.zeros((), dtype=torch.float32))


def sample_estimator(fn: Callable) -> Estimator:
    """A per-sample hook ``fn(rewards [N], group_size, algo) -> [N]`` as an :class:`Estimator`."""
    return Estimator(lambda x: fn(x.rewards, x.group_size, x.algo))


def _groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"expected a flat reward tensor whose length is a multiple of the group size "
            f"{group_size}, got shape {tuple(rewards.shape)}"
        )
    return rewards.float().view(-1, group_size)


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """``(r - mean_group(r)) / (std_group(r) + eps)``; std normalisation optional (Dr. GRPO).

    The std is the unbiased sample std, as GRPO's reference implementations use.
    """
    g = _groups(rewards, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if normalize_std and group_size > 1:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.flatten()


def dynamic_sampling_mask(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """DAPO dynamic sampling: True for the samples of groups whose rewards are not all equal.

    A group where every sample has the same reward has zero advantage everywhere and
    contributes no gradient; dropping it keeps the effective batch informative.
    """
    g = _groups(rewards, group_size)
    keep = (g.max(dim=1).values - g.min(dim=1).values) > 0
    return keep.repeat_interleave(group_size)


def overlong_penalty(
    response_lengths: torch.Tensor, *, max_len: int, buffer_len: int, penalty_factor: float = 1.0
) -> torch.Tensor:
    """DAPO soft overlong punishment, added to the reward.

    0 up to ``max_len - buffer_len``; then falls linearly to ``-penalty_factor`` at
    ``max_len``; ``-penalty_factor`` beyond.
    """
    if buffer_len <= 0 or buffer_len > max_len:
        raise ValueError(f"overlong buffer must be in (0, max_len={max_len}], got {buffer_len}")
    lengths = response_lengths.float()
    start = max_len - buffer_len
    pen = (start - lengths) / buffer_len * penalty_factor
    return pen.clamp(min=-penalty_factor, max=0.0)


def grpo(x: AdvantageInputs) -> torch.Tensor:
    """GRPO: ``A_i = (r_i − mean_group(r)) / (std_group(r) + ε)``; ``--no-grpo-std-normalization``: no division."""
    return grpo_advantages(x.rewards, x.group_size, normalize_std=not x.algo.no_grpo_std_normalization)


def rloo(x: AdvantageInputs) -> torch.Tensor:
    """RLOO: ``A_i = r_i − (Σ_{j≠i} r_j) / (n − 1)`` over the ``n`` samples of ``i``'s group (n ≥ 2)."""
    if x.group_size < 2:
        raise ValueError("rloo needs at least 2 samples per prompt (--n-samples-per-prompt)")
    g = _groups(x.rewards, x.group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (x.group_size - 1)
    return (g - others).flatten()


def whiten(values: torch.Tensor, mask: torch.Tensor, group=None, eps: float = 1e-8) -> torch.Tensor:
    """``(v − μ) / sqrt(σ² + ε)`` over the masked-in entries of every rank of ``group``; 0 elsewhere.

    μ = Σ m·v / N and σ² = (Σ m·v² − N·μ²) / (N − 1) (Bessel-corrected) with N = Σ m, summed over
    all ranks of ``group`` (the data-parallel group: the global batch) in ONE all-reduce of
    (Σ m·v, Σ m·v², N), so the result does not depend on how the batch is split over ranks.
    """
    m = mask.bool()
    v = values.double()
    t = torch.stack([v[m].sum(), (v[m] ** 2).sum(), m.sum().double()]).to(collective_device(group))
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    total, squares, n = t.tolist()
    mean = total / max(n, 1.0)
    var = (squares - n * mean * mean) / max(n - 1.0, 1.0)
    out = (v - mean) / (max(var, 0.0) + eps) ** 0.5
    return torch.where(m, out, torch.zeros((), dtype=v.dtype, device=v.device)).to(values.dtype)


def discounted_returns(token_rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = r_t + γ·G_{t'}`` with ``t'`` the next masked-in token after ``t`` (masked-out tokens are skipped:
    they neither earn reward nor count a discount step); 0 on masked-out tokens."""
    m = mask.bool()
    out = torch.zeros_like(token_rewards, dtype=torch.float32)
    running = torch.zeros(token_rewards.shape[0], dtype=torch.float32, device=token_rewards.device)
    for t in range(token_rewards.shape[1] - 1, -1, -1):
        running = torch.where(m[:, t], token_rewards[:, t].float() + gamma * running, running)
        out[:, t] = torch.where(m[:, t], running, torch.zeros_like(running))
    return out


def outcome_token_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[N, T]``: each sample's reward on its last masked-in token, 0 elsewhere (a sample without one gets none)."""
    m = mask.bool()
    n, t = m.shape
    last = torch.where(m, torch.arange(t, device=m.device)[None, :], torch.full_like(m, -1, dtype=torch.long))
    last = last.max(dim=1).values
    out = torch.zeros((n, t), dtype=torch.float32, device=m.device)
    has = last >= 0
    out[has.nonzero().flatten(), last[has]] = rewards.float().to(m.device)[has]
    return out


def reinforce_plus_plus(x: AdvantageInputs) -> torch.Tensor:
    """REINFORCE++: token returns of the outcome reward, KL-penalised, whitened over the global batch.

    Token reward ``r_t = R·[t = last policy token] − β·KL_t`` with β = ``--kl-coef`` and
    ``KL_t`` the ``--kl-type`` estimate of KL(π_old ‖ π_ref) at token ``t`` (the KL term then leaves
    the loss); ``G_t = Σ_{s ≥ t} γ^{s−t} r_s`` over the policy tokens (γ = ``--gamma``);
    ``A_t = whiten(G)`` over every DP rank's policy tokens (:func:`whiten`).
    """
    r = kl_penalised_token_rewards(x, "reinforce_plus_plus")
    return whiten(discounted_returns(r, x.mask, x.algo.gamma), x.mask, x.dp_group)


def kl_penalised_token_rewards(x: AdvantageInputs, who: str) -> torch.Tensor:
    """``[N, T]`` token rewards ``r_t = R·[t = last policy token] − β·KL_t`` (β = ``--kl-coef``; no KL term at 0).

    ``KL_t`` is the ``--kl-type`` estimate of KL(π_old ‖ π_ref) at token ``t``; estimators that fold it
    into the rewards (``Estimator.kl_in_reward``) take it out of the loss.
    """
    r = outcome_token_rewards(x.rewards, x.mask)
    if x.algo.kl_coef > 0:
        if x.old_logprobs is None or x.ref_logprobs is None:
            raise ValueError(f"{who} with --kl-coef > 0 needs old and reference log-probs")
        kl = kl_penalty(x.old_logprobs.float(), x.ref_logprobs.float(), x.algo.kl_type)
        r = r - x.algo.kl_coef * kl * x.mask
    return r


def reinforce_plus_plus_baseline(x: AdvantageInputs) -> torch.Tensor:
    """REINFORCE++-baseline: ``A_t = whiten(r_i − mean_group(r))`` on every policy token ``t`` of sample ``i``,
    whitened over every DP rank's policy tokens (:func:`whiten`)."""
    g = _groups(x.rewards, x.group_size)
    centred = (g - g.mean(dim=1, keepdim=True)).flatten()
    return whiten(token_advantages(centred, x.mask), x.mask, x.dp_group)


def compute_gae(
    token_rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens; (advantages, returns), **not** whitened.

    Rows are responses, columns their tokens in order (``[N, T]``)::

        δ_t = r_t + γ·V_{t'} − V_t          t' = the next masked-in token after t (V = 0 past the last)
        A_t = δ_t + γ·λ·A_{t'}
        R_t = A_t + V_t

    Masked-out tokens (tool / environment output, padding) are skipped by the recursion, as veRL
    does: they pass the next token's value and advantage through unchanged, so a masked span
    between two policy tokens acts like it is not there. At masked tokens A = 0 and R = V (they
    carry no loss). Whitening over the batch is a separate step.
    """
    if not (token_rewards.shape == values.shape == mask.shape) or values.dim() != 2:
        raise ValueError(
            f"compute_gae needs [N, T] rewards, values and mask of one shape, got "
            f"{tuple(token_rewards.shape)}, {tuple(values.shape)}, {tuple(mask.shape)}"
        )
    rewards, values, on = token_rewards.float(), values.float(), mask.bool()
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_adv = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_adv = torch.where(on[:, t], adv, next_adv)
        next_value = torch.where(on[:, t], values[:, t], next_value)
        advantages[:, t] = torch.where(on[:, t], adv, 0.0)
    return advantages, advantages + values


def gae(x: AdvantageInputs) -> torch.Tensor:
    """PPO with a critic: ``A = whiten(GAE(r, V))`` over the global batch's policy tokens.

    ``r`` are :func:`kl_penalised_token_rewards`, ``V`` the critic's values of the response tokens,
    GAE as in :func:`compute_gae` (γ = ``--gamma``, λ = ``--lam``); the critic's targets are
    :func:`gae_returns` (``A + V`` before whitening).
    """
    adv, _ = compute_gae(kl_penalised_token_rewards(x, "gae"), x.values, x.mask, x.algo.gamma, x.algo.lam)
    return whiten(adv, x.mask, x.dp_group)


def gae_returns(x: AdvantageInputs) -> torch.Tensor:
    """``[N, T]`` the critic's regression targets ``R_t = A_t + V_t`` (un-whitened GAE, as :func:`gae`)."""
    _, returns = compute_gae(kl_penalised_token_rewards(x, "gae"), x.values, x.mask, x.algo.gamma, x.algo.lam)
    return returns


def opd(x: AdvantageInputs) -> torch.Tensor:
    """On-policy distillation: ``A_t = log p_teacher(y_t) − log π_old(y_t) + c·A^grpo_i`` on the policy tokens.

    The first term is the per-token negative reverse KL's sample, which the clipped surrogate then
    pushes up: the policy moves toward the teacher on its own samples. ``c`` = ``--opd-coef``
    (default 0) adds the GRPO outcome advantage of the sample.
    """
    adv = x.teacher_logprobs.float() - x.old_logprobs.float()
    if x.algo.opd_coef > 0:
        adv = adv + x.algo.opd_coef * grpo(x)[:, None]
    return adv


# --advantage-estimator NAME (config.py:ADVANTAGE_ESTIMATORS mirrors the names); any other value is a
# dotted path to an Estimator or to a per-sample function fn(rewards, group_size, algo).
ESTIMATORS: dict[str, Estimator] = {
    "grpo": Estimator(grpo),
    "rloo": Estimator(rloo),
    "reinforce_plus_plus": Estimator(reinforce_plus_plus, kl_in_reward=True),
    "reinforce_plus_plus_baseline": Estimator(reinforce_plus_plus_baseline),
    "gae": Estimator(gae, needs=("values",), kl_in_reward=True),
    "opd": Estimator(opd, needs=("old_logprobs", "teacher_logprobs")),
}
