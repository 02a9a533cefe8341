"""Sequence-level advantages: GRPO / DAPO group normalisation, dynamic sampling, overlong shaping.

Rewards arrive as a flat tensor ordered group by group: ``n`` samples of prompt 0, then
``n`` samples of prompt 1, ... (``n = --n-samples-per-prompt``).
"""

from __future__ import annotations

import torch


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
