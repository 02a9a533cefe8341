"""``--advantage-estimator examples.extensions.advantages:rloo``: a custom advantage estimator.

A per-sample estimator is ``fn(rewards: Tensor[G·n], group_size: int, algo: AlgoConfig) -> Tensor[G·n]``
(rewards already shaped, e.g. by DAPO's overlong penalty; ``algo`` is ``cfg.algo``). The default
``grpo`` is ``(r − mean_group) / std_group`` (``--no-grpo-std-normalization``: no division).
This one is RLOO: each sample's baseline is the mean reward of the OTHER samples of its group
(also built in: ``--advantage-estimator rloo``). A per-token estimator is an
``megatron_mtp_rl.rl.advantages.Estimator``: ``fn(AdvantageInputs) -> Tensor[N, T]`` over the response
tokens, reading the loss mask, old / reference log-probs and critic values (see rl/advantages.py).
"""

from __future__ import annotations

import torch


def rloo(rewards: torch.Tensor, group_size: int, algo) -> torch.Tensor:
    g = rewards.float().view(-1, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / max(group_size - 1, 1)
    return (g - others).flatten()
