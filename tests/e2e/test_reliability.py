"""Reliability: validation messages, flaky rewards, NaN steps, crashes during checkpoint saves."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_mtp_rl.config import parse_config, resolve_model_args, validate
from megatron_mtp_rl.config import parse_config as parse_args
from megatron_mtp_rl.train.loop import run_training
from megatron_mtp_rl.train.setup import ConfigError
from tests.dist_utils import run_ranks
from tests.e2e.test_train import FAST, _strip

ROOT = Path(__file__).resolve().parents[2]
LOCK = ".mtp_rl.lock"


def _problems(*flags, world=1):
    cfg = parse_config([*FAST, *flags])
    return validate(cfg, world, resolve_model_args(cfg, 18))


@pytest.mark.parametrize(
    "flags, world, message",
    [
        (["--mtp-regime", "occ", "--mtp-num-layers", "0"], 1, "--mtp-regime occ needs MTP layers"),
        (["--mtp-regime", "policy", "--mtp-num-layers", "0"], 1, "--mtp-regime policy needs MTP layers"),
        (["--tensor-model-parallel-size", "3"], 3, "does not divide --num-attention-heads 4"),
        (["--tensor-model-parallel-size", "4", "--make-vocab-size-divisible-by", "9"], 4,
         "does not divide the padded vocabulary 18"),
        (["--preset", "tiny-moe", "--expert-model-parallel-size", "3"], 3, "does not divide --num-experts 4"),
        (["--preset", "tiny-moe", "--tensor-model-parallel-size", "2"], 2, "MoE with --tensor-model-parallel-size 2"),
        (["--preset", "tiny-moe", "--expert-model-parallel-size", "2", "--dynamic-sampling"], 2,
         "--dynamic-sampling with the local rollout engine and --expert-model-parallel-size > 1"),
        (["--global-batch-size", "7"], 1, "--global-batch-size 7 does not divide the rollout batch"),
        (["--rollout-batch-size", "3"], 2, "--rollout-batch-size 3 is not divisible by the data-parallel size 2"),
        (["--tensor-model-parallel-size", "2"], 3, "world size 3 is not divisible by TP×PP×CP"),
        (["--pipeline-model-parallel-size", "2"], 2, "local rollout engine generates with PP=1 only"),
        (["--seq-length", "8"], 1, "--seq-length 8 is shorter than the longest arith sample"),
    ],
)  # fmt: skip
def test_each_validation_message(flags, world, message):
    problems = _problems(*flags, world=world)
    assert any(message in p for p in problems), problems


def test_valid_configuration_has_no_problem():
    assert _problems() == []


def test_token_budget_micro_batches_with_ep_need_the_gpu_dispatcher():
    cfg = parse_config([*FAST, "--preset", "tiny-moe", "--expert-model-parallel-size", "2",
                        "--use-dynamic-batch-size", "--max-tokens-per-gpu", "64"])  # fmt: skip
    margs = resolve_model_args(cfg, 18)
    assert any("needs a GPU: on CPU megatron's all-gather" in p for p in validate(cfg, 2, margs, cuda=False))
    assert validate(cfg, 2, margs, cuda=True) == []


def test_zero_alignment_warning_is_printed(tmp_path, capsys):
    run_training(parse_args([*FAST, "--num-steps", "1", "--global-batch-size", "16"]))
    assert "the alignment proxy d = ℓ − ℓ_old is identically 0" in capsys.readouterr().err


def test_load_with_a_different_model_shape(tmp_path):
    run_training(parse_args([*FAST, "--num-steps", "1", "--save", str(tmp_path / "c")]))
    with pytest.raises(ConfigError, match=r"disagree with the checkpoint .*--hidden-size 32 \(the checkpoint has 64\)"):
        run_training(parse_args([*FAST, "--num-steps", "2", "--load", str(tmp_path / "c"), "--hidden-size", "32"]))


def test_bad_rows_are_skipped_and_counted(tmp_path):
    data = tmp_path / "p.jsonl"
    good = [json.dumps({"prompt": f"{i}+{i}", "label": str(2 * i)}) for i in range(4)]
    data.write_text("\n".join([good[0], "{oops", good[1], json.dumps({"prompt": ""}), *good[2:]]) + "\n")
    hist = run_training(
        parse_args(
            [*FAST, "--prompt-data", str(data), "--seq-length", "24", "--num-steps", "1", "--on-bad-row", "skip"]
        )
    )
    assert hist[1]["data/skipped_rows"] == 2.0
    with pytest.raises(Exception, match=r"p.jsonl:2: invalid JSON"):
        run_training(parse_args([*FAST, "--prompt-data", str(data), "--seq-length", "24", "--num-steps", "1"]))


def test_hanging_raising_and_crashing_rewards_do_not_stop_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("REWARD_FAULT_DIR", str(tmp_path))
    hist = run_training(
        parse_args(
            [
                *FAST,
                "--num-steps",
                "2",
                "--reward-fn",
                "tests.reward_faults:flaky",
                "--reward-timeout",
                "0.5",
                "--num-eval-prompts",
                "4",
            ]
        )  # fmt: skip
    )
    assert [h["step"] for h in hist] == [0, 1, 2]
    marks = [p.name.split("-")[0] for p in tmp_path.iterdir() if "-" in p.name]
    assert {"hang", "raise", "abort"} <= set(marks), marks
    counted = sum(h.get("rollout/reward_errors", 0) for h in hist[1:])
    rollout_marks = counted  # eval calls also fail; rollout errors are a subset of the marks
    assert 0 < rollout_marks <= len(marks)


def _nan_worker(rank, world, out_dir):
    os.environ["MTP_RL_FAULTS"] = "nan_loss@2"
    # ce: the MTP loss moves the main model every step, even while all rewards are 0.
    return run_training(
        parse_args([*FAST, "--num-steps", "3", "--mtp-regime", "ce", "--metrics-jsonl", f"{out_dir}/m.jsonl"])
    )


def test_nan_loss_skips_the_step_on_both_dp_ranks(tmp_path):
    a, b = run_ranks(_nan_worker, 2, tmp_path, str(tmp_path))
    for h in (a, b):
        assert h[1]["train/skipped_steps"] == 0.0
        assert h[2]["train/skipped_steps"] == h[2]["train/updates"] > 0  # every update of step 2
        assert h[2]["train/param_norm_main"] == h[1]["train/param_norm_main"]  # unchanged
        assert h[3]["train/skipped_steps"] == 0.0
        assert h[3]["train/param_norm_main"] != h[2]["train/param_norm_main"]  # continues


def _rows(path):
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The metrics rows of an uninterrupted 4-step CLI run (what every resumed run must reproduce)."""
    d = tmp_path_factory.mktemp("straight")
    code, out = _cli(d, "--num-steps", "4", "--metrics-jsonl", str(d / "a.jsonl"))
    assert code == 0, out[-2000:]
    return _rows(d / "a.jsonl")


def _cli(tmp_path, *flags, env=None):
    """Run ``mtp-rl train`` in its own session; after it exits, kill whatever it left behind
    (a crashed trainer's helper processes), as a dead node would take them along."""
    log = tmp_path / f"cli-{len(list(tmp_path.glob('cli-*')))}.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_mtp_rl.cli", "train", *FAST, *flags],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return code, log.read_text()


@pytest.mark.slow  # the SIGTERM save-and-resume test stays fast
def test_crash_during_checkpoint_save_leaves_the_previous_one(tmp_path, straight):
    ckpt = tmp_path / "ckpt"
    fault = {"MTP_RL_FAULTS": "crash_in_save@4"}
    code, out = _cli(tmp_path, "--num-steps", "4", "--save-interval", "2", "--save", str(ckpt),
                     "--metrics-jsonl", str(tmp_path / "b.jsonl"), env=fault)  # fmt: skip
    assert code == 17, out[-2000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert (ckpt / ".tmp_iter_0000004").is_dir()
    assert not (ckpt / "iter_0000004").exists()
    code, out = _cli(
        tmp_path,
        "--num-steps",
        "4",
        "--load",
        str(ckpt),
        "--save",
        str(ckpt),
        "--metrics-jsonl",
        str(tmp_path / "b.jsonl"),
    )
    assert code == 0, out[-2000:]
    rows_b = _rows(tmp_path / "b.jsonl")
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3, 4]
    assert _strip(rows_b) == _strip(straight)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert not list(ckpt.glob(".tmp_iter_*"))  # the crashed save's leftover went with the next save


def test_resume_with_a_different_lr_says_how_to_fix_it(tmp_path):
    run_training(parse_args([*FAST, "--num-steps", "1", "--save", str(tmp_path / "c")]))
    with pytest.raises(ConfigError, match=r"optimizer parameter groups differ .* add --finetune"):
        run_training(parse_args([*FAST, "--num-steps", "2", "--load", str(tmp_path / "c"), "--lr", "5e-4"]))


def _start(tmp_path, *flags):
    log = open(tmp_path / f"bg-{len(list(tmp_path.glob('bg-*')))}.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_mtp_rl.cli", "train", *FAST, *flags],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    return proc, log


def _listening(pid: int) -> set[str]:
    """Addresses the process tree of ``pid`` listens on."""
    import psutil

    out = set()
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            out |= {c.laddr.ip for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        except psutil.Error:
            pass
    return out


def _session(pid: int) -> list[int]:
    """Live processes of the session ``pid`` started (its helpers), zombies excluded."""
    import psutil

    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getsid(p.pid) == pid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return alive


def _files(root: Path) -> dict:
    """Every file's bytes, the lock file aside (it names whichever run holds it)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK}


def test_sigterm_saves_the_step_and_the_same_command_resumes_it(tmp_path, straight):
    """SIGTERM mid-run: the step finishes, is saved, rc 143. Meanwhile a second run on the same
    --save refuses (naming the pid), and no socket listens on every interface. Re-running the
    command resumes (--no-auto-resume: refused, nothing touched) and matches an uninterrupted run."""
    ckpt, m = tmp_path / "ckpt", tmp_path / "b.jsonl"
    flags = ["--num-steps", "4", "--save", str(ckpt), "--metrics-jsonl", str(m)]
    proc, log = _start(tmp_path, *flags)
    try:
        listening: set[str] = set()
        deadline = time.monotonic() + 300
        while not (m.exists() and len(m.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
            assert proc.poll() is None, log.read()
            listening |= _listening(proc.pid)
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        # A concurrent run on the same --save / --metrics-jsonl (its start-up check, from this process).
        from megatron_mtp_rl.train.run_lock import lock_run

        holder = rf"in use by another run \(pid {proc.pid} on host {socket.gethostname()}"
        with pytest.raises(ConfigError, match="--save .*" + holder):
            lock_run(str(ckpt), None)
        with pytest.raises(ConfigError, match="--metrics-jsonl .*" + holder):
            lock_run(None, str(m))
        code = proc.wait(timeout=300)
        log.seek(0)
        out = log.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    k = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert code == 143 and 1 <= k < 4, out[-2000:]
    assert f"stopped: received SIGTERM after step {k}/4; checkpoint {ckpt}/iter_{k:07d} saved" in out
    assert [r["step"] for r in _rows(m)] == list(range(k + 1))
    assert listening and not listening & {"0.0.0.0", "::"}, listening
    time.sleep(1.0)
    assert _session(proc.pid) == [], "helper processes outlived the trainer"
    before = {**_files(ckpt), "m": m.read_bytes()}
    with pytest.raises(ConfigError, match=f"--save {ckpt} already holds checkpoints .* --no-auto-resume is set"):
        run_training(parse_args([*FAST, *flags, "--no-auto-resume"]))
    assert {**_files(ckpt), "m": m.read_bytes()} == before  # refused: nothing pruned, truncated or moved
    code, out = _cli(tmp_path, *flags)
    assert code == 0 and f"resuming from iter_{k:07d}" in out, out[-2000:]
    assert all(_files(ckpt)[n] == b for n, b in before.items() if n.startswith(f"iter_{k:07d}"))
    rows = _rows(m)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert _strip(rows) == _strip(straight)


def test_a_fresh_start_into_a_used_save_moves_the_earlier_run_aside(tmp_path, capsys):
    """`--load A --finetune --save B` with B used (e.g. `make demo` twice): B's earlier run is
    renamed to B.1 whole, never overwritten or pruned; fine-tuning from B itself moves nothing."""
    a, b, m = tmp_path / "a", tmp_path / "b", tmp_path / "b" / "m.jsonl"
    one = [*[f for f in FAST if f != "--quiet"], "--num-steps", "1", "--num-eval-prompts", "0"]
    run_training(parse_args([*one, "--save", str(a)]))
    run_training(parse_args([*one, "--save", str(b), "--metrics-jsonl", str(m)]))
    before = _files(b)
    capsys.readouterr()
    run_training(parse_args([*one, "--load", str(a), "--finetune", "--save", str(b), "--metrics-jsonl", str(m)]))
    out = capsys.readouterr().out
    assert f"--save {b} held an earlier run (newest iter_0000001): moved it to {b}.1" in out, out
    before.pop("m.jsonl.lock")  # the metrics lock is this run's now: it stays
    assert _files(Path(f"{b}.1")) == before  # every file of the earlier run, byte for byte
    assert (b / "iter_0000001").is_dir() and [r["step"] for r in _rows(m)] == [0, 1]
    run_training(parse_args([*one, "--load", str(b), "--finetune", "--save", str(b)]))
    assert not Path(f"{b}.2").exists()


def test_unwritable_save_fails_before_the_model_is_built(tmp_path, monkeypatch):
    from megatron_mtp_rl.train import builders

    (tmp_path / "file").write_text("x")  # root ignores permissions: a path under a file is unwritable for all
    monkeypatch.setattr(builders, "build_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ConfigError, match=r"--save .*file/ck is not writable: Not a directory"):
        run_training(parse_args([*FAST, "--num-steps", "1", "--save", str(tmp_path / "file" / "ck")]))


def test_a_flipped_byte_in_a_shard_fails_the_load_naming_the_file(tmp_path):
    from megatron_mtp_rl.train.checkpoint import CheckpointError

    run_training(parse_args([*FAST, "--num-steps", "1", "--save", str(tmp_path / "c")]))
    shard = next((tmp_path / "c" / "iter_0000001").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"checkpoint file {shard} is corrupt"):
        run_training(parse_args([*FAST, "--num-steps", "2", "--load", str(tmp_path / "c")]))
    # Without a manifest (older checkpoints) a truncated shard is still named: torch's reader says only EOFError.
    (shard.parent / "manifest.json").unlink()
    os.truncate(shard, shard.stat().st_size // 3)
    with pytest.raises(CheckpointError, match=rf"checkpoint file {shard} is unreadable \(EOFError"):
        run_training(parse_args([*FAST, "--num-steps", "2", "--load", str(tmp_path / "c")]))


@pytest.mark.slow  # the sandbox unit tests cover the faults fast
def test_a_reward_that_always_raises_stops_the_run_with_its_traceback(tmp_path):
    code, out = _cli(tmp_path, "--num-steps", "2", "--reward-fn", "tests.reward_faults:boom")
    assert code == 1, out[-2000:]
    assert "error: every reward call of step 1 failed (16 of 16)" in out and "ValueError: boom" in out
    assert "loop.py" not in out  # the worker's traceback, not the trainer's


def test_nan_and_string_rewards_are_counted_errors_and_shown(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("REWARD_FAULT_DIR", str(tmp_path))
    flags = ["--num-steps", "1", "--num-eval-prompts", "0", "--reward-fn", "tests.reward_faults:mixed"]
    hist = run_training(parse_args([*[f for f in FAST if f != "--quiet"], *flags]))
    marks = [p.name.split("-")[0] for p in tmp_path.iterdir() if "-" in p.name]
    assert {"nan", "string"} <= set(marks) and len(marks) < 16
    assert hist[1]["rollout/reward_errors"] == len(marks)  # every NaN and every "0.75" counted
    assert hist[1]["train/skipped_steps"] == 0.0  # NaN rewards no longer poison the update
    assert f"reward errors {len(marks)}" in capsys.readouterr().out


@pytest.mark.slow  # ~60 s: a 15 s collective timeout, then torchrun's 30 s grace period for the stopped rank
def test_a_stopped_peer_ends_both_ranks_within_two_minutes(tmp_path):
    """Rank 1 SIGSTOPped mid-run (a hung node): with --distributed-timeout-minutes 0.25 rank 0 gives up,
    naming the collective and the rank it waited on, and torchrun takes rank 1 down with it."""
    import psutil

    from tests.dist_utils import free_port

    m = tmp_path / "m.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "megatron_mtp_rl.cli", "train", *FAST, "--num-steps", "50",
           "--distributed-timeout-minutes", "0.25", "--metrics-jsonl", str(m)]  # fmt: skip
    log = open(tmp_path / "torchrun.log", "w+")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    ranks: dict = {}
    try:
        deadline = time.monotonic() + 300
        while not (m.exists() and len(m.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
            assert proc.poll() is None, log.read()
            time.sleep(0.2)
        ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children()}
        rank1 = [ranks["1"]]
        rank1[0].send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        code = proc.wait(timeout=180)
        elapsed = time.monotonic() - t0
    finally:
        for p in [proc, *ranks.values()]:  # torchrun's workers run in sessions of their own
            try:
                p.kill()
            except (ProcessLookupError, psutil.Error):
                pass
    log.seek(0)
    out = log.read()
    assert code != 0 and elapsed < 120, (code, elapsed, out[-3000:])
    # Where rank 0 is caught depends on timing: a plain collective (OCC's all_reduce, the stop flag) or
    # megatron's gradient sync, whose all-reduces wait where their coalescing block closes.
    named = r"(all_reduce|broadcast|all_gather\w*|coalesced collectives opened by \w+)"
    assert re.search(rf"error: rank 0 timed out in {named} with ranks \[1\] \(group \[0, 1\]\)", out), out[-3000:]
    assert not rank1[0].is_running() or rank1[0].status() == psutil.STATUS_ZOMBIE
