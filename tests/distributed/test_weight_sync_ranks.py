"""``distributed`` weight sync from two trainer ranks (gloo on 127.0.0.1) to a fake SGLang engine process.

EP=2: rank 0 is the one sender, rank 1 only takes part in the expert gathers. PP=2: each stage's
sender has a group of its own (``mtp_rl_weight_sync`` and ``mtp_rl_weight_sync_pp1``). Two pushes
(the weights changed in between) reach the engine bucket by bucket, equal to the whole-model
reference. A new trainer against the same engine, which still holds groups of the names it joins,
pushes as well (it used to wait at the rendezvous until the store's timeout: an engine refuses a
second group of a name). Then the local supervisor's restart hook runs on rank 0 (a restarted engine
has no group): the next push, on every rank, drops the old group on the engine and builds one under a
new name (``reset_group``).
"""

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.dist_utils import free_port, run_ranks

FAKE = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")
ROOT = Path(__file__).resolve().parents[2]


def _state(url: str) -> dict:
    with urllib.request.urlopen(url + "/_fake/state", timeout=5) as r:
        return json.loads(r.read())


def _worker(rank, world, url, layout, export_dir, plan):
    """Push once per letter of ``plan``: ``p`` as is, ``c`` after changing every weight, ``n`` from a new
    WeightSync (the old one's group dropped on this side only, as when a trainer exits), ``r`` after
    the supervisor's restart hook ran on rank 0 (every rank's sync then rebuilds its group)."""
    import torch

    from megatron_mtp_rl import platform
    from megatron_mtp_rl.cluster.weight_sync import WeightSync, hf_tensors, resync_engine
    from megatron_mtp_rl.hf.export import is_stage_sender
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine

    split = "pipeline_model_parallel_size" if layout == "pp" else "expert_model_parallel_size"
    platform.initialize(platform.ParallelSizes(**{split: world}), seed=7)
    margs = get_preset("tiny-moe")
    model = build_model(margs)
    engine = SGLangEngine(url) if rank == 0 or is_stage_sender() else None

    def new_sync():
        return WeightSync(engine, model, margs, mode="distributed", bucket_bytes=64 * 1024, export_dir=export_dir)

    sync = new_sync()
    out = {"sender": is_stage_sender(), "refs": [], "names": [], "groups": [], "pushes": []}
    try:
        for step in plan:
            if step == "c":
                with torch.no_grad():
                    for p in model.parameters():
                        p.add_(0.25)
            if step == "n":
                if sync._group is not None:
                    torch.distributed.destroy_process_group(sync._group)
                sync = new_sync()
            if step == "r" and rank == 0:  # the local supervisor restarted an engine: its hook, on rank 0 only
                resync_engine(sync, url)
            out["refs"].append({n: float(t.double().sum()) for n, t in hf_tensors(model, margs, sync.flavour).items()})
            out["pushes"].append(sync())
            out["names"].append([n for b in sync.last_buckets for n in b])
            out["groups"].append(sync.group_name)
    finally:
        if engine is not None:
            engine.close()
    return out


def _start_fake(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, FAKE, "--port", str(port), "--model-path", str(ROOT)],
        env=dict(os.environ, PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES=""),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            _state(f"http://127.0.0.1:{port}")
            return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise AssertionError("the fake SGLang engine did not start")


# slow: a two-rank EP push lands on the real engine in the fast suite (test_real_sglang_sync.py)
@pytest.mark.slow
@pytest.mark.parametrize("layout", ["ep", "pp"])
def test_two_ranks_push_distributed_twice_then_rebuild_the_group(tmp_path, layout):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    fake = _start_fake(port)
    try:
        ranks = run_ranks(_worker, 2, tmp_path, url, layout, str(tmp_path / "x"), "pcnr", timeout=240)
        st = _state(url)
    finally:
        fake.terminate()
        fake.wait(10)
    senders = [r for r in ranks if r["sender"]]
    assert len(senders) == (2 if layout == "pp" else 1)
    assert [p["rollout/weight_version"] for p in ranks[0]["pushes"]] == [1.0, 2.0, 1.0, 2.0]
    base = ["mtp_rl_weight_sync", "mtp_rl_weight_sync_pp1"][: len(senders)]
    for push, names in enumerate([base, base, base, [f"{b}_g1" for b in base]]):
        assert sorted(s["groups"][push] for s in senders) == names  # one group per stage's sender
    inits = [r["body"]["group_name"] for r in st["log"] if r["route"] == "/init_weights_update_group"]
    # the new trainer joined under the names the engine still held: it had them dropped first
    assert sorted(inits) == sorted(base * 2 + [f"{b}_g1" for b in base])
    drops = [r["body"]["group_name"] for r in st["log"] if r["route"] == "/destroy_weights_update_group"]
    assert sorted(drops) == sorted(base * 3 + [f"{b}_g1" for b in base])  # before each join + reset_group's
    assert st["update_groups"] == sorted(f"{b}_g1" for b in base)  # reset_group dropped the old ones
    i = 0
    for push, ref in enumerate(ranks[0]["refs"]):  # every push, tensor for tensor, equal to the reference
        got = st["received"][i : i + len(ref)]
        i += len(ref)
        assert sorted(n for n, _ in got) == sorted(ref)  # each tensor once (a PP stage sends only its own)
        assert sorted(n for s in senders for n in s["names"][push]) == sorted(ref)
        assert all(abs(v - ref[n]) <= 1e-6 * max(1.0, abs(ref[n])) for n, v in got)
        if len(senders) == 1:  # one sender: the engine took its buckets in order
            assert [n for n, _ in got] == senders[0]["names"][push]
    assert i == len(st["received"])
    assert ranks[0]["refs"][1] != ranks[0]["refs"][0]  # the second push carried changed weights
    assert st["weight_version"] == "2"
