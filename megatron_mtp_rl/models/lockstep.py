"""Generation in lockstep across the ranks whose MoE layers exchange tokens (expert parallelism).

Every forward of a MoE layer gathers tokens over megatron's expert tensor-and-model-parallel group
(CPU: an all-gather of equal-sized pieces; GPU: an all-to-all), so those ranks must run the same
forwards with the same number of tokens. Each rank generates its own prompts (its data-parallel
shard), whose count, length and finishing step differ: the ranks agree on the batch rows, the prompt
width, every drafting window, and keep stepping until all of them are done (a finished rank's
extra forwards change none of its rows). Without such a group every agreement is the rank's own value.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


class Lockstep:
    """Agreements over ``group`` (None: this rank alone; every method returns its own value)."""

    def __init__(self, group=None, device: torch.device | str = "cpu"):
        self.group = group
        self.device = device

    @classmethod
    def for_model(cls, gpt: torch.nn.Module) -> Lockstep:
        """The group a MoE model's forwards exchange tokens over, when it has more than one rank."""
        if not getattr(gpt.config, "num_moe_experts", None) or not dist.is_initialized():
            return cls()
        group = parallel_state.get_expert_tensor_and_model_parallel_group(check_initialized=False)
        if group is None or dist.get_world_size(group) == 1:
            return cls()
        return cls(group, next(gpt.parameters()).device)

    @property
    def active(self) -> bool:
        return self.group is not None

    def _reduce(self, values: list[int], op) -> list[int]:
        if self.group is None:
            return list(values)
        t = torch.tensor(values, dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=op, group=self.group)
        return t.tolist()

    def max(self, *values: int) -> list[int]:
        return self._reduce(list(values), dist.ReduceOp.MAX)

    def min(self, value: int) -> int:
        return self._reduce([value], dist.ReduceOp.MIN)[0]

    def all_done(self, done: bool) -> bool:
        """True once every rank is done (a collective: every rank calls it at the same step)."""
        return bool(self.min(int(done)))
