"""``mtp-rl train --ray --rollout-engine sglang`` on two simulated nodes (``ray.cluster_utils.Cluster``,
2 logical GPUs each): 2 trainers and 2 fake SGLang engines placed disaggregated, a router on the
head node; two RL steps finish, and their metrics equal the same job's without Ray (2 gloo ranks, the
engines and router started by rank 0)."""

import math
import sys
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from megatron_mtp_rl.cluster.ray_launch import launch
from megatron_mtp_rl.config import parse_config
from tests.dist_utils import free_port, run_ranks
from tests.e2e.test_train import FAST

FAKE = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")


def _without_ray(rank: int, world: int, flags: list[str]) -> list[dict]:
    from megatron_mtp_rl.train.loop import run_training

    return run_training(parse_config(flags))


def _comparable(row: dict) -> dict:
    """A metrics row without what measures time (or speed) and so differs between any two runs."""
    return {k: v for k, v in row.items() if not k.startswith("perf/") and not k.endswith(("_per_s", "_time"))}


@pytest.mark.slow
def test_two_nodes_two_trainers_two_engines_disaggregated(tmp_path, capsys, monkeypatch):
    # logical GPUs: Ray refuses them under an empty CUDA_VISIBLE_DEVICES; the trainers stay on CPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("MTP_RL_FORCE_CPU", "1")
    job = [*FAST, "--num-steps", "2", "--rollout-engine", "sglang", "--rollout-num-engines", "2",
           "--rollout-server-cmd", f"{sys.executable} {FAKE}",
           "--rollout-router-cmd", f"{sys.executable} {FAKE} --router"]  # fmt: skip
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 2, "include_dashboard": False})
    second = cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        head_id = ray.get_runtime_context().get_node_id()
        ray_flags = ["--ray", "--ray-num-trainers", "2", "--ray-gpus-per-trainer", "1",
                     "--ray-rollout-placement", "disaggregated", "--rollout-hf-dir", str(tmp_path / "hf")]  # fmt: skip
        cfg = parse_config([*job, *ray_flags])
        hist = launch(cfg)
    finally:
        ray.shutdown()
        cluster.shutdown()
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("placement: ")]
    print("\n".join(lines), file=sys.stderr)
    table = {tuple(ln.split()[1:3]): dict(kv.split("=") for kv in ln.split()[3:]) for ln in lines}
    assert set(table) == {("trainer", "0"), ("trainer", "1"), ("engine", "0"), ("engine", "1"), ("router", "0")}
    assert table[("trainer", "0")]["node"] == table[("trainer", "1")]["node"] == head_id  # PACK: head first
    assert {table[("engine", e)]["node"] for e in "01"} == {second.node_id}
    assert table[("router", "0")]["node"] == head_id
    assert sorted(table[("engine", e)]["gpus"] for e in "01") == ["0", "1"]
    assert [h["step"] for h in hist] == [0, 1, 2]
    assert [h["rollout/weight_version"] for h in hist[1:]] == [1.0, 2.0]
    for h in hist[1:]:
        assert math.isfinite(h["train/policy_loss"])
        # the engines returned log-probs: the rollout–trainer mismatch is measured (the fake's are not the model's)
        assert h["rollout/logprob_abs_diff"] > 0.0 and h["rollout/mismatch_kl"] > 0.0

    # the same job without Ray: equal metrics, step for step (same seeds per data-parallel rank, same engines)
    ports = [free_port(span=11), free_port()]  # engines at base and base + 10, the router
    plain, _ = run_ranks(_without_ray, 2, tmp_path / "plain", [*job, "--rollout-hf-dir", str(tmp_path / "hf2"),
                         "--rollout-base-port", str(ports[0]), "--rollout-router-port", str(ports[1])])  # fmt: skip
    assert [h["step"] for h in plain] == [0, 1, 2]
    differ = []
    for ray_row, plain_row in zip(hist, plain):
        a, b = _comparable(ray_row), _comparable(plain_row)
        assert sorted(a) == sorted(b), set(a) ^ set(b)
        differ += [(ray_row["step"], k, a[k], b[k]) for k in a if a[k] != pytest.approx(b[k], rel=1e-6, abs=1e-9)]
    assert not differ, differ
    assert len(_comparable(hist[1])) > 30  # policy loss, rewards, OCC λ, MTP, weight version, mismatch...
