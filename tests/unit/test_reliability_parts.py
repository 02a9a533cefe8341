"""Run lock, writability, append-only metrics JSONL, checkpoint manifest, graceful stop: the parts, alone."""

import json
import os
import signal
import socket

import pytest
import torch

from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.train.checkpoint import (
    CheckpointError,
    check_finite,
    read_trainer_state,
    resolve_auto_resume,
    verify_checkpoint,
    write_manifest,
)
from megatron_mtp_rl.train.jsonl_log import open_metrics_jsonl, read_rows
from megatron_mtp_rl.train.run_lock import RunLock, check_writable, lock_run, release_all
from megatron_mtp_rl.train.signals import TIME_LIMIT_EXIT, GracefulStop, StopRequested


def test_second_lock_refused_with_holder_pid_and_host(tmp_path):
    locks = lock_run(str(tmp_path / "save"), str(tmp_path / "m.jsonl"))
    try:
        with pytest.raises(ConfigError, match=rf"--save .* in use by another run \(pid {os.getpid()} on host "
                           + socket.gethostname()):  # fmt: skip
            lock_run(str(tmp_path / "save"), None)
        with pytest.raises(ConfigError, match=r"--metrics-jsonl .*m.jsonl is in use"):
            lock_run(None, str(tmp_path / "m.jsonl"))
    finally:
        release_all(locks)
    release_all(lock_run(str(tmp_path / "save"), str(tmp_path / "m.jsonl")))  # free again once released


def test_unwritable_save_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"--save .* is not writable: Not a directory"):
        check_writable(blocker / "ckpt", f"--save {blocker / 'ckpt'}")
    with pytest.raises(ConfigError, match="is not writable"):
        RunLock(blocker / "sub" / ".lock", "--save x").acquire()


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_metrics_jsonl_resume_drops_later_rows_and_torn_line_but_keeps_the_original(tmp_path):
    path = tmp_path / "m.jsonl"
    original = "".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(5)) + '{"step": 5, "x'
    path.write_text(original)
    f = open_metrics_jsonl(str(path), resume_step=2)
    f.write(json.dumps({"step": 3, "x": 30}) + "\n")
    f.close()
    assert [r["step"] for r in _rows(path)] == [0, 1, 2, 3] and _rows(path)[-1]["x"] == 30
    assert (tmp_path / "m.jsonl.1").read_text() == original  # nothing lost
    assert read_rows(tmp_path / "m.jsonl.1")[1] == 1  # one torn line
    # A clean resume appends in place; a fresh run moves the file aside instead of truncating it.
    open_metrics_jsonl(str(path), resume_step=3).close()
    assert not (tmp_path / "m.jsonl.2").exists() and len(_rows(path)) == 4
    open_metrics_jsonl(str(path), resume_step=0).close()
    assert len(_rows(tmp_path / "m.jsonl.2")) == 4 and path.read_text() == ""


def _fake_checkpoint(root):
    root.mkdir()
    (root / "__0_0.distcp").write_bytes(os.urandom(10000))
    torch.save({"step": 3}, root / "trainer_state.pt")
    write_manifest(root)
    return root


def test_manifest_names_a_flipped_byte_and_a_truncated_file(tmp_path):
    ck = _fake_checkpoint(tmp_path / "iter_0000003")
    assert verify_checkpoint(ck) is True
    shard = ck / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[4321] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint file .*__0_0.distcp is corrupt"):
        verify_checkpoint(ck)
    state = ck / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:50])
    with pytest.raises(CheckpointError, match=r"trainer_state.pt is truncated"):
        read_trainer_state(ck)
    os.remove(ck / "manifest.json")  # an unverified checkpoint: the unpickler's error still names the file
    with pytest.raises(CheckpointError, match=r"checkpoint file .*trainer_state.pt is unreadable"):
        read_trainer_state(ck)


def test_non_finite_parameter_is_named():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    check_finite(m)
    with torch.no_grad():
        m[1].bias[0] = float("nan")
    with pytest.raises(CheckpointError, match=r"parameter 1.bias holds NaN/inf"):
        check_finite(m)


def test_used_save_resumes_or_is_refused(tmp_path):
    save = tmp_path / "s"
    assert resolve_auto_resume(str(save), None) == (None, "")  # new directory: fresh run
    save.mkdir()
    _fake_checkpoint(save / "iter_0000003")
    (save / "latest_checkpointed_iteration.txt").write_text("3\n")
    load, msg = resolve_auto_resume(str(save), None)
    assert load == str(save) and "resuming from iter_0000003" in msg
    with pytest.raises(ConfigError, match="--no-auto-resume is set"):
        resolve_auto_resume(str(save), None, auto_resume=False)
    assert resolve_auto_resume(str(save), "/elsewhere") == ("/elsewhere", "")  # an explicit --load wins


def test_first_signal_is_noted_and_time_limit_stops():
    before = signal.getsignal(signal.SIGTERM)  # SIG_DFL, or e.g. Ray's handler when an in-process test started Ray
    stop = GracefulStop().install()
    try:
        assert not stop.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.should_stop()
        exc = stop.stop(4, 10, "/ckpt/iter_0000004")
        assert isinstance(exc, StopRequested) and exc.code == 143
        assert exc.message == ("stopped: received SIGTERM after step 4/10; checkpoint /ckpt/iter_0000004 saved; "
                               "rerun the same command to resume")  # fmt: skip
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back
    timed = GracefulStop(exit_duration_in_mins=0.5, start_time=0.0)
    assert timed.should_stop() and timed.stop(1, 2, None).code == TIME_LIMIT_EXIT


def test_a_second_signal_exits_at_once_unless_it_is_the_same_request_delivered_twice():
    import subprocess
    import sys

    code = (
        "import os, signal, time\n"
        "from megatron_mtp_rl.train.signals import GracefulStop\n"
        "stop = GracefulStop().install()\n"
        "import megatron_mtp_rl.train.signals as s\n"
        "s.SAME_REQUEST_S = 0.5\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "assert stop.signum == signal.SIGINT\n"
        # Ctrl-C under torchrun: SIGINT from the terminal, then SIGTERM forwarded by torchrun: one request
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(1.0)\n"
        "print('still running', flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 143, out.stderr[-1000:]
    assert out.stdout == "still running\n" and out.stderr.count("second") == 1
    assert "SIGINT received: finishing this step" in out.stderr and "second SIGTERM: exiting now" in out.stderr
