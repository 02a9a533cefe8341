"""``mtp-rl train --ray --rollout-engine sglang`` on two simulated nodes (``ray.cluster_utils.Cluster``,
2 logical GPUs each): 2 trainers and 2 fake SGLang engines placed disaggregated, a router on the
head node; two RL steps finish and match the same job without Ray."""

import math
import sys
from pathlib import Path

import pytest
import ray
from ray.cluster_utils import Cluster

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.ray_launch import launch
from tests.e2e.test_train import FAST

FAKE = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")


@pytest.mark.slow
def test_two_nodes_two_trainers_two_engines_disaggregated(tmp_path, capsys, monkeypatch):
    # logical GPUs: Ray refuses them under an empty CUDA_VISIBLE_DEVICES; the trainers stay on CPU
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("MTP_RL_FORCE_CPU", "1")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 3, "num_gpus": 2, "include_dashboard": False})
    second = cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        head_id = ray.get_runtime_context().get_node_id()
        cfg = parse_config([*FAST, "--num-steps", "2", "--ray", "--ray-num-trainers", "2",
                            "--ray-gpus-per-trainer", "1", "--rollout-engine", "sglang", "--rollout-num-engines", "2",
                            "--ray-rollout-placement", "disaggregated",
                            "--rollout-server-cmd", f"{sys.executable} {FAKE}",
                            "--rollout-router-cmd", f"{sys.executable} {FAKE} --router",
                            "--rollout-hf-dir", str(tmp_path / "hf")])  # fmt: skip
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
