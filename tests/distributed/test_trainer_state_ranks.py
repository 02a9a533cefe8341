"""A checkpoint's trainer state is written by rank 0 but holds what lives on other ranks.

OCC's λ is measured and used on the last pipeline stage (rank 0 of PP=2 never updates its own
copy), and with --async-rollout every data-parallel rank holds its own share of the batch
generated ahead; resuming from rank 0's copy of either made PP and DP resumes inexact.
"""

from types import SimpleNamespace

from tests.dist_utils import run_ranks


class _Occ:
    def __init__(self, lam: float):
        self.lam = lam

    def state_dict(self) -> dict:
        return {"lambdas": [self.lam], "guard_events": 0, "skipped_updates": int(self.lam * 10)}


def _worker(rank: int, world: int) -> dict:
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.train import loop

    platform.initialize(platform.ParallelSizes(pipeline_model_parallel_size=world), seed=1)
    occ = loop._last_stage_occ_state(SimpleNamespace(occ=_Occ(0.05 if rank == 0 else 0.3)))
    saved = loop._per_rank({"step": 4, "batch": f"rank {rank}'s share"})  # what rank 0 writes
    return {"occ": occ, "mine": loop._my_pending(saved), "other_world": loop._my_pending({"per_rank": [saved] * 3})}


def test_checkpointed_occ_state_is_the_last_stages_and_pending_batches_stay_per_rank(tmp_path):
    first, last = run_ranks(_worker, 2, tmp_path)
    assert first["occ"] == last["occ"] == {"lambdas": [0.3], "guard_events": 0, "skipped_updates": 3}
    assert [first["mine"]["batch"], last["mine"]["batch"]] == ["rank 0's share", "rank 1's share"]
    assert first["other_world"] is None and last["other_world"] is None  # another world size: regenerated
