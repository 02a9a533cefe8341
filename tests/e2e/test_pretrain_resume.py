"""``mtp-rl pretrain`` loses no work: a stop saves its step, the same command resumes it exactly."""

import json

import pytest

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.checkpoint import latest_checkpoint, read_trainer_state
from megatron_mtp_rl.train.pretrain import run_pretrain
from megatron_mtp_rl.train.signals import TIME_LIMIT_EXIT, StopRequested

FLAGS = [
    "--preset", "tiny-dense", "--global-batch-size", "8", "--micro-batch-size", "8", "--seq-length", "16",
    "--num-eval-prompts", "4", "--rollout-max-response-len", "4", "--num-steps", "3", "--quiet",
]  # fmt: skip


def _rows(path):
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")} for line in open(path)]


def _trainer_state(ckpt):
    return read_trainer_state(latest_checkpoint(str(ckpt)))


def test_a_stopped_pretrain_saves_its_step_and_the_same_command_finishes_it_exactly(tmp_path, capsys):
    straight = run_pretrain(parse_config([*FLAGS, "--save", str(tmp_path / "a")], "pretrain"))
    flags = [*FLAGS, "--save", str(tmp_path / "b"), "--metrics-jsonl", str(tmp_path / "b.jsonl")]
    # A wall-clock limit already reached: the first step finishes, is saved, exit code 3.
    with pytest.raises(StopRequested) as stopped:
        run_pretrain(parse_config([*flags, "--exit-duration-in-mins", "1e-9"], "pretrain"))
    assert stopped.value.code == TIME_LIMIT_EXIT
    assert f"after step 1/3; checkpoint {tmp_path / 'b'}/iter_0000001 saved" in stopped.value.message
    assert _trainer_state(tmp_path / "b")["step"] == 1
    loud = [f for f in flags if f != "--quiet"]
    resumed = run_pretrain(parse_config(loud, "pretrain"))  # the same command: resumes at step 1
    out = capsys.readouterr().out
    assert f"pretrain: resumed at step 1/3 from {tmp_path / 'b'}" in out and "step 3/3" in out, out
    assert _trainer_state(tmp_path / "b")["step"] == 3
    assert [r["step"] for r in _rows(tmp_path / "b.jsonl")] == [1, 3]
    for k in ("pretrain/main_ce", "pretrain/mtp_ce_1", "eval/accuracy"):
        assert resumed[k] == straight[k], k
    shards = sorted(p.name for p in (tmp_path / "a" / "iter_0000003").glob("*.distcp"))
    assert shards  # same weights and optimizer state, byte for byte
    for name in shards:
        a, b = (tmp_path / d / "iter_0000003" / name for d in "ab")
        assert a.read_bytes() == b.read_bytes(), name


def test_train_loads_a_warm_start_as_weights_only(tmp_path, capsys):
    from megatron_mtp_rl.train.loop import run_training
    from tests.e2e.test_train import FAST

    run_pretrain(parse_config([*FLAGS, "--num-steps", "1", "--save", str(tmp_path / "w")], "pretrain"))
    loud = [f for f in FAST if f != "--quiet"]
    hist = run_training(parse_config([*loud, "--num-steps", "1", "--load", str(tmp_path / "w")]))
    assert [h["step"] for h in hist] == [0, 1]  # RL starts at step 0, not at the warm start's step
    assert "is a pretrain (warm start) checkpoint: loading its weights only, as with --finetune" in (
        capsys.readouterr().out
    )
