"""mtp-rl heal: MTP layers trained on the policy's rollouts, the main model bit-identical."""

import json

import pytest

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.train.heal import run_heal
from megatron_mtp_rl.train.loop import run_training
from megatron_mtp_rl.train.signals import TIME_LIMIT_EXIT, StopRequested

FAST = [
    "--preset", "tiny-dense", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
    "--rollout-max-response-len", "4", "--global-batch-size", "8", "--micro-batch-size", "8",
    "--seq-length", "16", "--num-eval-prompts", "8", "--quiet", "--reward-workers", "0",
]  # fmt: skip


def test_heal_trains_the_mtp_layers_only(tmp_path):
    rl = tmp_path / "rl"
    run_training(parse_config([*FAST, "--num-steps", "1", "--save", str(rl)]))
    jsonl = tmp_path / "heal.jsonl"
    flags = [*FAST, "--load", str(rl), "--save", str(tmp_path / "healed"), "--num-steps", "2", "--lr", "1e-2"]
    res = run_heal(parse_config([*flags, "--mtp-head-loss", "distill", "--metrics-jsonl", str(jsonl)], "heal"))
    # the saved checkpoint, read back, has the input's main parameters bit for bit; MTP layers moved
    assert res["main_digest_saved"] == res["main_digest_input"]
    assert res["mtp_digest_saved"] != res["mtp_digest_input"]
    assert res["steps"] == 2
    assert all(a > b for a, b in zip(res["after"], res["before"])), (res["before"], res["after"])
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    steps = [r for r in rows if "mtp/accept_1" in r]
    assert [r["step"] for r in steps] == [1, 2] and all("mtp/head_loss_2" in r for r in steps)
    # Stopped early (a time limit already reached; SIGTERM takes the same path): what is healed is saved.
    stopped = tmp_path / "stopped"
    with pytest.raises(StopRequested) as exc:
        run_heal(parse_config([*FAST, "--load", str(rl), "--save", str(stopped), "--num-steps", "2",
                               "--mtp-head-loss", "ce", "--exit-duration-in-mins", "1e-9"], "heal"))  # fmt: skip
    assert exc.value.code == TIME_LIMIT_EXIT
    assert f"after heal step 1/2; checkpoint {stopped}/iter_0000001 saved" in exc.value.message
    assert (stopped / "latest_checkpointed_iteration.txt").read_text().strip() == "1"


def test_heal_flag_errors(tmp_path):
    with pytest.raises(ConfigError, match="needs --load"):
        run_heal(parse_config([*FAST, "--save", str(tmp_path / "x")], "heal"))
    with pytest.raises(ConfigError, match="ce or distill"):
        run_heal(parse_config([*FAST, "--load", "a", "--save", "b", "--mtp-head-loss", "none"], "heal"))
