"""Under torchrun a configuration error is printed once (by rank 0), which exits with code 2.

Every rank parses the same flags and checks the same configuration; the other ranks stay quiet and
wait for the launcher, whose SIGTERM (it ends the job once rank 0 exited) they answer with code 2 too
(a rank still starting up when torchrun ends it shows the SIGTERM).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import free_port

ROOT = Path(__file__).resolve().parents[2]
EXIT = re.compile(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)")


def _torchrun(*flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megatron_mtp_rl.train", *flags]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=240)


def _check(out: subprocess.CompletedProcess, message: str) -> None:
    assert out.stderr.count(message) == 1, out.stderr[-3000:]
    assert "megatron_mtp_rl/" not in out.stderr, out.stderr[-3000:]  # no trainer traceback (torchrun has its own)
    codes = dict(EXIT.findall(out.stderr))  # torchrun's summary: one entry per failed rank
    # rank 1 exits 2 as well, or is ended by torchrun (SIGTERM, -15) before it even reached the check
    assert codes["0"] == "2" and codes["1"] in ("2", "-15"), out.stderr[-3000:]


def test_a_config_file_error_is_printed_once_by_rank_0(tmp_path):
    """The CLI's ConfigError path, before torch is imported (so the test takes torchrun's start-up only)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("num-steps: 1.5\n")
    _check(_torchrun("--config", str(bad)), f"error: {bad}:1: num-steps: expected an integer, got 1.5")


@pytest.mark.slow  # the same path as the config-file error, after megatron is imported and the group made
def test_a_world_size_check_is_printed_once_by_rank_0():
    out = _torchrun("--rollout-batch-size", "3", "--num-steps", "1")
    _check(out, "--rollout-batch-size 3 is not divisible by the data-parallel size 2")


@pytest.mark.slow  # the flag parser's own path
def test_a_command_line_error_is_printed_once_by_rank_0():
    out = _torchrun("--num-step", "1")
    _check(out, "unrecognized arguments: --num-step")
