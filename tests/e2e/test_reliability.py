"""Reliability: validation messages, flaky rewards, NaN steps, crashes during checkpoint saves."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mtp_rl.config import parse_config, resolve_model_args, validate
from megatron_mtp_rl.config import parse_config as parse_args
from megatron_mtp_rl.train.loop import run_training
from megatron_mtp_rl.train.setup import ConfigError
from tests.dist_utils import run_ranks
from tests.e2e.test_train import FAST, _strip

ROOT = Path(__file__).resolve().parents[2]


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


def test_zero_alignment_warning_is_printed(tmp_path, capsys):
    run_training(parse_args([*FAST, "--num-steps", "1", "--global-batch-size", "16"]))
    assert "the alignment proxy d = ℓ − ℓ_old is identically 0" in capsys.readouterr().err


def test_load_with_a_different_model_shape(tmp_path):
    run_training(parse_args([*FAST, "--num-steps", "1", "--save", str(tmp_path / "c")]))
    with pytest.raises(ConfigError, match=r"different model shape \(hidden_size: checkpoint 64 vs run 32"):
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


def test_crash_during_checkpoint_save_leaves_the_previous_one(tmp_path):
    ckpt = tmp_path / "ckpt"
    fault = {"MTP_RL_FAULTS": "crash_in_save@4"}
    code, out = _cli(tmp_path, "--num-steps", "4", "--save-interval", "2", "--save", str(ckpt),
                     "--metrics-jsonl", str(tmp_path / "b.jsonl"), env=fault)  # fmt: skip
    assert code == 17, out[-2000:]
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
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
    code, out = _cli(tmp_path, "--num-steps", "4", "--metrics-jsonl", str(tmp_path / "a.jsonl"))
    assert code == 0, out[-2000:]
    rows_a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_b] == [0, 1, 2, 3, 4]
    assert _strip(rows_b) == _strip(rows_a)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "4"


def test_resume_with_a_different_lr_says_how_to_fix_it(tmp_path):
    run_training(parse_args([*FAST, "--num-steps", "1", "--save", str(tmp_path / "c")]))
    with pytest.raises(ConfigError, match=r"optimizer parameter groups differ .* add --finetune"):
        run_training(parse_args([*FAST, "--num-steps", "2", "--load", str(tmp_path / "c"), "--lr", "5e-4"]))
