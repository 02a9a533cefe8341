"""A collective timeout names what waited: megatron's gradient sync waits where a coalesced block closes."""

from __future__ import annotations

import datetime
import time
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_ranks


def sync_grads(group) -> None:
    """Stands in for megatron's ``start_grad_sync``: its all-reduces run inside a coalescing block."""
    from torch.distributed import _coalescing_manager

    with _coalescing_manager(group, async_ops=False):
        torch.distributed.all_reduce(torch.ones(4), group=group)


def _rank_0_waits_for_a_rank_that_never_comes(rank: int, world: int, done: str) -> tuple[str | None, float]:
    """Rank 0's message and the collective timeout ``initialize`` gave the default group.

    Nothing here races the clock: start-up has a generous timeout (a slow spawn under load cannot
    trip it), the short one is set after both ranks met, and rank 1 stays alive, never joining,
    until rank 0 has its message (``done`` appears) — rank 0 can only see a timeout, never a closed
    connection."""
    import torch.distributed as dist

    from megatron_mtp_rl.platform.distributed import describe_timeout, initialize

    initialize(timeout_s=120.0)
    configured = dist.group.WORLD._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    dist.barrier()
    dist.set_timeout(datetime.timedelta(seconds=2))  # this rank's next collectives only
    if rank == 1:
        deadline = time.monotonic() + 50.0
        while not Path(done).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return None, configured
    try:
        sync_grads(dist.group.WORLD)
        msg = "no timeout"
    except Exception as e:  # noqa: BLE001 - the message under test
        msg = describe_timeout(e)
    finally:
        Path(done).touch()
    return msg, configured


@pytest.mark.slow  # a real collective timeout (seconds of waiting by design)
def test_a_coalesced_grad_sync_timeout_names_the_block_and_the_peer(tmp_path):
    (msg, configured), (_, configured_1) = run_ranks(
        _rank_0_waits_for_a_rank_that_never_comes, 2, tmp_path, str(tmp_path / "done"), timeout=60
    )
    assert configured == configured_1 == 120.0  # initialize's timeout is the collectives' (gloo)
    assert msg is not None and msg.startswith(
        "rank 0 timed out in coalesced collectives opened by sync_grads with ranks [1] (group [0, 1]): "
    ), msg
    assert "--distributed-timeout-minutes" in msg and "Timed out" in msg, msg
