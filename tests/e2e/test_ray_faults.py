"""``mtp-rl train --ray``: a trainer actor that dies mid-run (its process SIGKILLed, as the OOM killer or a
lost node would) ends the job in one line, leaves no process behind, and its last checkpoint loads."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.checkpoint import latest_checkpoint
from megatron_mtp_rl.train.loop import run_training
from tests.e2e.test_train import FAST

ROOT = Path(__file__).resolve().parents[2]
FAKE = str(ROOT / "tests" / "fake_sglang_server.py")


def _wait_for(what: str, ok, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        assert proc.poll() is None, f"the job ended (code {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} after {timeout:g}s:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _steps(jsonl: Path) -> list[int]:
    if not jsonl.exists():
        return []
    return [json.loads(line)["step"] for line in jsonl.read_text().splitlines() if line.endswith("}")]


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            pass
    return left


@pytest.mark.slow  # 60-145 s on 2 cores: the suite's Ray-engine layout is covered by test_ray_engine_restart[tensor]
def test_a_killed_trainer_ends_the_job_in_one_line_and_its_last_checkpoint_loads(tmp_path):
    save, jsonl, out, err = tmp_path / "ckpt", tmp_path / "m.jsonl", tmp_path / "out.log", tmp_path / "err.log"
    flags = [*FAST, "--num-steps", "50", "--eval-interval", "100", "--save", str(save), "--save-interval", "1",
             "--metrics-jsonl", str(jsonl)]  # fmt: skip
    # disaggregated: colocated engines would hand GPU memory back and forth, which a CPU engine refuses
    ray_flags = ["--ray", "--ray-num-trainers", "2", "--rollout-engine", "sglang", "--rollout-hf-dir",
                 str(tmp_path / "hf"), "--rollout-server-cmd", f"{sys.executable} {FAKE}",
                 "--ray-rollout-placement", "disaggregated"]  # fmt: skip
    with open(out, "w") as fo, open(err, "w") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "megatron_mtp_rl.train", *flags, *ray_flags], cwd=ROOT,
                                stdout=fo, stderr=fe, start_new_session=True)  # fmt: skip
    everything: list[psutil.Process] = []
    try:
        trainers: dict[int, tuple[str, int]] = {}  # rank -> (node, pid), from the placement lines

        def placed() -> bool:
            for m in re.finditer(r"^placement: trainer (\d) node=(\S+) gpus=\S+ pid=(\d+)$", out.read_text(), re.M):
                trainers[int(m[1])] = (m[2], int(m[3]))
            return len(trainers) == 2

        _wait_for("trainer placement lines", placed, proc, err)
        # step 2 logged: its checkpoint was written (a save comes before the step's row); step 3 is under way
        _wait_for("step 2 in the metrics", lambda: 2 in _steps(jsonl), proc, err)
        everything = psutil.Process(proc.pid).children(recursive=True)  # Ray, trainers, engine actor, fake server
        assert any("fake_sglang_server" in " ".join(p.cmdline()) for p in everything)
        node, pid = trainers[1]
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        code = proc.wait(timeout=120)
        took = time.monotonic() - killed_at
        left = _alive(everything)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in everything:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    stderr = err.read_text()
    assert code == 1, stderr[-3000:]
    assert "Traceback" not in stderr and "Traceback" not in out.read_text(), stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, stderr[-3000:]
    assert errors[0].startswith(f"error: trainer rank 1 on node {node} failed: its actor process (pid {pid}) died (")
    assert took < 60, took  # the surviving rank (blocked in a collective) was killed, not waited for
    assert not left, left  # trainers, engine actor, fake server, Ray's own processes: all gone

    # the last checkpoint is whole: one rank loads it (model, optimizer, trainer state) and trains on
    last = latest_checkpoint(str(save))
    assert last is not None
    done = int(Path(last).name.removeprefix("iter_"))
    assert done >= 2 and done - max(_steps(jsonl)) in (0, 1)  # a save precedes its step's row
    cfg = parse_config([*FAST, "--num-steps", str(done + 1), "--eval-interval", "100", "--load", str(save)])
    hist = run_training(cfg)
    assert [h["step"] for h in hist] == [done + 1]
    assert hist[0]["train/policy_loss"] == hist[0]["train/policy_loss"]  # finite, not NaN


@pytest.mark.slow
def test_the_driver_itself_ends_the_other_ranks_and_the_placement_group(tmp_path, monkeypatch):
    """In-process (a cluster that outlives the job, as with RAY_ADDRESS): when rank 1 dies, launch() has
    killed rank 0 — blocked in a collective — and removed the placement group before it raises."""
    import threading

    import ray
    from ray.util import placement_group_table

    from megatron_mtp_rl.cluster import ray_launch
    from megatron_mtp_rl.errors import TrainerFailed

    seen: list[dict] = []

    def lines(infos):
        seen.extend(infos)
        return original(infos)

    original = ray_launch._trainer_lines
    monkeypatch.setattr(ray_launch, "_trainer_lines", lines)
    jsonl = tmp_path / "m.jsonl"

    def kill_rank1_after_step1():
        deadline = time.monotonic() + 300
        while 1 not in _steps(jsonl) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(seen[1]["pid"], signal.SIGKILL)

    killer = threading.Thread(target=kill_rank1_after_step1, daemon=True)
    killer.start()
    cfg = parse_config([*FAST, "--num-steps", "50", "--eval-interval", "100", "--ray", "--ray-num-trainers", "2",
                        "--metrics-jsonl", str(jsonl)])  # fmt: skip
    try:
        with pytest.raises(TrainerFailed) as failed:
            ray_launch.launch(cfg)
        raised = time.monotonic()
        assert str(failed.value).startswith(f"trainer rank 1 on node {seen[1]['node']} failed: its actor process")
        rank0 = psutil.Process(seen[0]["pid"]) if psutil.pid_exists(seen[0]["pid"]) else None
        while rank0 is not None and _alive([rank0]) and time.monotonic() - raised < 10:
            time.sleep(0.1)
        assert rank0 is None or not _alive([rank0]), "rank 0 still runs after launch() raised"
        assert {g["state"] for g in placement_group_table().values()} == {"REMOVED"}
    finally:
        ray.shutdown()
