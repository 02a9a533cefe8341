"""The critic's clipped value loss (PPO), per token.

Like the policy's ratio clip, the value clip keeps one update from moving a value far from the
value the advantages were computed with (``V_old``)::

    L_t = ½ · max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −c, c) − R_t)²)

``c = --value-clip``; 0 turns the clip off (``L_t = ½ (V_t − R_t)²``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ValueLossTerms:
    loss: torch.Tensor  # [.., T] per-token loss (aggregate with the policy's --loss-agg-mode)
    clipped: torch.Tensor  # [.., T] bool: the clipped branch was the larger one


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, value_clip: float
) -> ValueLossTerms:
    """Per-token ``L_t`` above and where the clip was active."""
    err = (values - returns).square()
    if value_clip <= 0:
        return ValueLossTerms(loss=0.5 * err, clipped=torch.zeros_like(err, dtype=torch.bool))
    held = old_values + (values - old_values).clamp(-value_clip, value_clip)
    err_held = (held - returns).square()
    return ValueLossTerms(loss=0.5 * torch.maximum(err, err_held), clipped=err_held > err)
