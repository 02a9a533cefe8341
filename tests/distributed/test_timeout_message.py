"""A collective timeout names what waited: megatron's gradient sync waits where a coalesced block closes."""

from __future__ import annotations

import time

import torch

from tests.dist_utils import run_ranks


def sync_grads(group) -> None:
    """Stands in for megatron's ``start_grad_sync``: its all-reduces run inside a coalescing block."""
    from torch.distributed import _coalescing_manager

    with _coalescing_manager(group, async_ops=False):
        torch.distributed.all_reduce(torch.ones(4), group=group)


def _rank_0_waits_for_a_rank_that_never_comes(rank: int, world: int) -> str | None:
    import torch.distributed as dist

    from megatron_mtp_rl.platform.distributed import describe_timeout, initialize

    initialize(timeout_s=2.0)
    if rank == 1:
        time.sleep(6.0)  # alive (no "connection closed"), but never joins
        return None
    try:
        sync_grads(dist.group.WORLD)
    except Exception as e:  # noqa: BLE001 - the message under test
        return describe_timeout(e)
    return "no timeout"


def test_a_coalesced_grad_sync_timeout_names_the_block_and_the_peer(tmp_path):
    msg, _ = run_ranks(_rank_0_waits_for_a_rank_that_never_comes, 2, tmp_path, timeout=60)
    assert msg is not None and msg.startswith(
        "rank 0 timed out in coalesced collectives opened by sync_grads with ranks [1] (group [0, 1]): "
    ), msg
    assert "--distributed-timeout-minutes" in msg and "Timed out" in msg, msg
