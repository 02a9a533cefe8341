"""``--rollout-function examples.extensions.rollout:with_length_stats``: a custom rollout function.

A rollout function is ``fn(manager, fetch, *, num_prompts, seed, group_filter, max_rounds)
-> RolloutBatch``; ``fetch(count)`` returns the next prompts of this DP rank's stream and
``manager`` (rollout/manager.py) generates groups with rewards. The default is
``RolloutManager.rollout`` (with DAPO's dynamic sampling when a filter is given). This one
runs the default and adds the longest response length to the step's metrics.
"""

from __future__ import annotations

from megatron_mtp_rl.rollout.manager import RolloutBatch, RolloutManager


def with_length_stats(manager: RolloutManager, fetch, **kw) -> RolloutBatch:
    batch = manager.rollout(fetch, **kw)
    batch.metrics["rollout/response_len_max"] = float(max(len(s.response_ids) for s in batch.samples))
    return batch
