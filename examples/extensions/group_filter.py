"""``--dynamic-sampling --dynamic-sampling-filter examples.extensions.group_filter:drop_all_failed``.

A group filter is ``fn(rewards: Tensor[G·n], group_size: int) -> bool Tensor[G·n]``: True for
the samples to keep; it keeps or drops whole groups (``n`` consecutive samples). Dropped
groups are replaced by new prompts for up to ``--max-sampling-rounds`` rounds. The default,
DAPO's ``megatron_mtp_rl.rl.advantages:dynamic_sampling_mask``, drops groups whose rewards
are all equal (zero advantage, no gradient). This one only drops groups where every sample
failed, keeping all-correct groups (e.g. to keep the MTP heads training on solved prompts).
"""

from __future__ import annotations

import torch


def drop_all_failed(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    groups = rewards.view(-1, group_size)
    keep = groups.max(dim=1).values > 0
    return keep.repeat_interleave(group_size)
