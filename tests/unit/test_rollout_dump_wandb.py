"""Rollout dumps, tools/show_rollouts.py and the W&B writer (offline, no network)."""

import json
import time

import pytest

from megatron_mtp_rl.rollout.data import Prompt
from megatron_mtp_rl.rollout.dump import RolloutDumper, logprob_gap, read_dumps
from megatron_mtp_rl.rollout.manager import Sample


def _samples():
    p = Prompt(
        text="<|im_start|>user\nWhat is 6*7?<|im_end|>\n<|im_start|>assistant\n",
        label="42",
        index=0,
        where="d.parquet row 1",
    )
    return [
        Sample(p, [1, 2, 3], [5, 6, 2], [-0.5, -1.0, -0.25], "It is \\boxed{42}", True, reward=1.0, group=0),
        Sample(p, [1, 2, 3], [7, 8, 9, 9], [-2.0, -0.1, -0.1, -0.1], "no idea", False, reward=0.0, group=0),
        Sample(p, [1, 2, 3], [2], [-3.0], "", True, reward=0.0, group=0),
    ]


def test_logprob_gap():
    g = logprob_gap([-1.0, -2.0], [-1.5, -1.0])
    assert g == {"mean": pytest.approx(-0.25), "abs_mean": pytest.approx(0.75), "abs_max": 1.0, "tokens": 2}
    assert logprob_gap([], [-1.0]) is None


def test_dump_holds_the_formatted_prompt_and_show_rollouts_prints_it(tmp_path, capsys):
    from tools.show_rollouts import main as show

    d = RolloutDumper(tmp_path / "dumps", n=2)
    s = _samples()
    path = d.dump(3, s, advantages=[1.1547, -0.5774, -0.5774], trainer_logprobs=[[-0.5, -1.25, -0.25], None])
    assert path.name == "step_000003.jsonl"
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert len(recs) == 2  # --rollout-dump-n
    r = recs[0]
    assert r["prompt"] == s[0].prompt.text and r["response"] == "It is \\boxed{42}"
    assert (r["prompt_tokens"], r["response_tokens"], r["reward"], r["advantage"]) == (3, 3, 1.0, 1.1547)
    assert r["source"] == "d.parquet row 1" and r["label"] == "42" and r["finished"] is True
    assert r["logprob_gap"]["abs_max"] == pytest.approx(0.25) and "logprob_gap" not in recs[1]
    assert read_dumps(tmp_path / "dumps") == recs
    assert not RolloutDumper(tmp_path / "off", n=2, enabled=False).active and not (tmp_path / "off").exists()
    assert show([str(tmp_path / "dumps"), "--min-reward", "1"]) == 0
    out = capsys.readouterr().out
    assert "step 3 · sample 0 · group 0 · reward 1.000 · advantage +1.155 · tokens 3+3" in out
    assert "<|im_start|>user\nWhat is 6*7?" in out and "It is \\boxed{42}" in out
    assert "no idea" not in out and "1 sample(s) from 1 step(s), mean reward 1.000" in out


def test_wandb_offline_writes_a_run_with_the_step_scalars_and_config(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the 'wandb' extra is not installed")
    from megatron_mtp_rl.train.metrics import MetricsWriter, WandbSettings
    from tests.wandb_reader import read_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    settings = WandbSettings(project="mtp-rl-test", run_name="tiny", mode="offline", save_dir=str(tmp_path / "wb"))
    settings.check()
    w = MetricsWriter(
        str(tmp_path / "m.jsonl"), None, enabled=True, wandb=settings, run_config={"rollout": {"n_samples": 4}}
    )
    run_dir = w.wandb.dir
    w.log(1, {"rollout/reward_mean": 0.25, "train/lr": 1e-3, "occ/lambda_1": float("nan")})
    w.log(2, {"rollout/reward_mean": 0.5, "train/lr": 1e-3})
    w.close()
    for _ in range(100):  # wandb's service process finishes writing the run file shortly after finish()
        history, config = read_run(run_dir)
        if len(history) == 2:
            break
        time.sleep(0.1)
    assert "offline-run-" in run_dir
    assert [(h["_step"], h["rollout/reward_mean"]) for h in history] == [(1, 0.25), (2, 0.5)]
    assert "occ/lambda_1" not in history[0]  # non-finite: skipped, as in TensorBoard
    assert config["rollout"] == {"n_samples": 4}
    # off unless asked; a bad mode is a one-line config error
    assert not WandbSettings().enabled and not WandbSettings(project="p", mode="disabled").enabled
    from megatron_mtp_rl.errors import ConfigError

    with pytest.raises(ConfigError, match="--wandb-mode 'sometimes'"):
        WandbSettings(project="p", mode="sometimes").check()


def test_every_stop_id_ends_a_response_locally_and_in_the_sglang_request():
    import torch

    from megatron_mtp_rl.models.generation import SamplingParams, _Output
    from megatron_mtp_rl.rollout.sglang.schema import build_generate_payload

    params = SamplingParams(max_new_tokens=5, eos_id=2, stop_ids=(7, 2))
    assert params.stops == (2, 7)
    out = _Output(3, params, 5)
    tokens = torch.tensor([[4, 7, 5], [4, 5, 2], [4, 5, 6]])
    out.add(tokens, torch.zeros(3, 3), torch.tensor([3, 3, 3]))
    res = out.result({})
    assert res.responses == [[4, 7], [4, 5, 2], [4, 5, 6]] and res.finished == [True, True, False]
    sp = build_generate_payload([1], params, rid="r")["sampling_params"]
    assert sp["stop_token_ids"] == [2, 7]


def test_wandb_online_without_a_login_is_refused_before_the_build(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the 'wandb' extra is not installed")
    from megatron_mtp_rl.config import parse_config, validate

    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    cfg = parse_config(["--wandb-project", "p"])
    assert any("--wandb-mode online needs a W&B login" in p for p in validate(cfg, 1))
    assert not any("W&B" in p for p in validate(parse_config(["--wandb-project", "p", "--wandb-mode", "offline"]), 1))
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert not any("W&B" in p for p in validate(cfg, 1))


def test_progress_line_shows_the_lag_and_the_buffer_of_long_generations():
    from megatron_mtp_rl.train.metrics import progress_line

    plain = progress_line(3, 10, {"rollout/reward_mean": 0.5, "rollout/accuracy": 0.25, "perf/step_time": 1.0})
    assert "lag" not in plain and "buffer" not in plain
    m = {"rollout/policy_lag": 1.25, "rollout/policy_lag_max": 2.0, "rollout/buffer_size": 12.0,
         "rollout/stale_dropped": 4.0, "perf/step_time": 1.0}  # fmt: skip
    line = progress_line(3, 10, m)
    assert "lag 1.25 (max 2)" in line and "buffer 12" in line and "stale dropped 4" in line
    assert "stale" not in progress_line(3, 10, {**m, "rollout/stale_dropped": 0.0})
