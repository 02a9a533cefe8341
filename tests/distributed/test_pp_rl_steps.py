"""PP=2 through a whole RL run (the fake SGLang engine generates: the local engine needs PP=1).

Two RL steps with OCC, a KL reference and checkpoints on 2 pipeline stages must log what the
same run logs on one stage: the checkpoint loads on both stages (megatron's tied MTP stage has an
output-layer weight its own checkpoint code refuses), the reference scores through the pipeline,
and the HF export / weight push carries every stage's tensors (the MTP layers live on the last).
"""

import json
import sys
from pathlib import Path

import pytest

from tests.dist_utils import free_port, run_ranks
from tests.e2e.test_train import FAST

FAKE = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")
COMPARED = ("train/", "occ/", "mtp/", "rollout/reward_mean", "eval/accuracy")


def by_text(prompt: str, response: str, label: str) -> float:
    """A deterministic reward that varies within a group (so the advantages are not all zero)."""
    return float(sum(map(ord, response)) % 3 == 0)


def _run(rank: int, world: int, out: str, load: str) -> None:
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training

    ports = [int(p) for p in Path(out, "ports").read_text().split()]
    run_training(parse_config([
        *FAST, "--preset", "tiny-moe", "--num-steps", "2", "--pipeline-model-parallel-size", str(world),
        "--rollout-engine", "sglang", "--rollout-server-cmd", f"{sys.executable} {FAKE}",
        "--rollout-router-cmd", f"{sys.executable} {FAKE} --router", "--rollout-base-port", str(ports[0]),
        "--rollout-router-port", str(ports[1]), "--rollout-hf-dir", f"{out}/hf", "--weight-sync-mode", "tensor",
        "--reward-fn", f"{__name__}:by_text", "--reward-workers", "0", "--mtp-regime", "occ", "--kl-coef", "0.05",
        "--load", load, "--finetune", "--save", f"{out}/ckpt", "--metrics-jsonl", f"{out}/m.jsonl",
    ]))  # fmt: skip


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "m.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k == "step" or k.startswith(COMPARED)} for r in rows]


def _warm_start(rank: int, world: int, out: str) -> None:
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training

    run_training(parse_config([*FAST, "--preset", "tiny-moe", "--num-steps", "1", "--save", out]))


@pytest.fixture(scope="module")
def init(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("init")
    run_ranks(_warm_start, 1, d / "ranks", str(d / "ckpt"))
    return str(d / "ckpt")


def test_pp2_rl_run_logs_what_pp1_logs(tmp_path, init):
    from megatron_mtp_rl.cluster.weight_sync import shard_names

    rows, names = {}, {}
    for pp in (1, 2):
        out = tmp_path / f"pp{pp}"
        out.mkdir()
        (out / "ports").write_text(f"{free_port(span=11)} {free_port()}")
        run_ranks(_run, pp, out / "ranks", str(out), init, timeout=300)
        rows[pp] = _rows(out)
        assert (out / "ckpt" / "iter_0000002").is_dir()
        shards = sorted(p.name for p in (out / "hf" / "init").glob("model*.safetensors"))
        # one process writes one file; with PP=2 each stage writes its own shard, named in one index
        assert shards == (["model.safetensors"] if pp == 1 else [f"model-0000{k}-of-00002.safetensors" for k in (1, 2)])
        names[pp] = sorted(shard_names(out / "hf" / "init"))
    assert names[1] == names[2]
    one, two = rows[1], rows[2]
    assert [r["step"] for r in two] == [0, 1, 2] and [sorted(r) for r in two] == [sorted(r) for r in one]
    assert two[2]["train/kl"] > 0 and two[1]["train/policy_loss"] != 0  # a real update, then a KL term
    for a, b in zip(one, two):
        for k, v in a.items():
            if k == "rollout/weight_buckets":  # every stage's sender fills its own buckets
                assert b[k] >= v
                continue
            assert abs(b[k] - v) <= 1e-4 * max(1.0, abs(v)), (a["step"], k, v, b[k])


def _heal(rank: int, world: int, out: str, load: str) -> dict:
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.heal import run_heal

    ports = [int(p) for p in Path(out, "ports").read_text().split()]
    res = run_heal(parse_config([
        *FAST, "--preset", "tiny-moe", "--num-steps", "2", "--pipeline-model-parallel-size", str(world),
        "--rollout-engine", "sglang", "--rollout-server-cmd", f"{sys.executable} {FAKE}",
        "--rollout-router-cmd", f"{sys.executable} {FAKE} --router", "--rollout-base-port", str(ports[0]),
        "--rollout-router-port", str(ports[1]), "--rollout-hf-dir", f"{out}/hf", "--reward-workers", "0",
        "--mtp-head-loss", "distill", "--load", load, "--save", f"{out}/healed",
    ], "heal"))  # fmt: skip
    return {k: res[k] for k in ("before", "after", "main_digest_input", "main_digest_saved", "mtp_digest_input",
                                "mtp_digest_saved")}  # fmt: skip


@pytest.mark.slow  # PP=2: the RL-run test of this file stays fast
def test_heal_with_pp2_trains_the_last_stage_mtp_layers_only(tmp_path, init):
    """The head-only loss never reaches the trunk, so the last stage would send no input gradient back
    and 1F1B would wait for it forever; the schedule gives it a zero one."""
    (tmp_path / "ports").write_text(f"{free_port(span=11)} {free_port()}")
    first, last = run_ranks(_heal, 2, tmp_path / "ranks", str(tmp_path), init, timeout=240)
    for stage in (first, last):
        assert stage["main_digest_saved"] == stage["main_digest_input"]  # bit-identical, read back
    assert first["mtp_digest_saved"] == first["mtp_digest_input"]  # no MTP layer on the first stage
    assert last["mtp_digest_saved"] != last["mtp_digest_input"]
    assert all(a > b for a, b in zip(last["after"], last["before"])), last
