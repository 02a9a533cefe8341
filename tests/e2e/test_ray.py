"""``mtp-rl train --ray``: the tiny job on a local Ray cluster (loopback) on CPU."""

import json
import math
import os

import pytest
import ray  # installed by the test extra

from megatron_mtp_rl.cluster.ray_launch import launch
from megatron_mtp_rl.config import parse_config
from tests.e2e.test_train import FAST


@pytest.mark.parametrize(
    "placement, trainers, mode",
    [("disaggregated", 2, "sync"), pytest.param("disaggregated", 2, "async", marks=pytest.mark.slow)],
)
def test_two_rl_steps_on_ray(tmp_path, placement, trainers, mode):
    """Sync: every batch from the current weights. Async: the actor generates step n+1 while step n
    trains, one step off-policy (lag 0 for the first batch, then 1)."""
    cfg = parse_config(
        [
            *FAST,
            "--num-steps",
            "2",
            "--ray",
            "--ray-num-trainers",
            str(trainers),
            "--ray-rollout-placement",
            placement,
            "--metrics-jsonl",
            str(tmp_path / "m.jsonl"),
            *(["--async-rollout"] if mode == "async" else []),
        ]  # fmt: skip
    )
    try:
        hist = launch(cfg)
    finally:
        ray.shutdown()
    assert [h["step"] for h in hist] == [0, 1, 2]
    for h in hist[1:]:
        assert math.isfinite(h["train/policy_loss"]) and math.isfinite(h["occ/lambda_1"])
        # measured (not an empty 0), and tiny: every sample came from the pushed weights (the
        # replica starts from other ones), never before the push it depends on
        assert 0.0 < h["rollout/logprob_abs_diff"] < 1e-3, h["rollout/logprob_abs_diff"]
    # initial push (version 1) + one push after each step
    assert [h["rollout/weight_version"] for h in hist[1:]] == [2.0, 3.0]
    assert (tmp_path / "m.jsonl").read_text().count("\n") == 3
    if mode == "async":
        assert [h["rollout/policy_lag"] for h in hist[1:]] == [0.0, 1.0]


@pytest.mark.slow
def test_bounded_staleness_on_ray(tmp_path):
    """--max-off-policy-steps 2 with the Ray rollout actor: the first step generates batches 1 and 2 from
    θ_0, then step n's generates batch n+2 from θ_{n-1}; the lag is 0, 1, then 2 and never above."""
    cfg = parse_config(
        [*FAST, "--num-steps", "4", "--ray", "--ray-num-trainers", "1", "--max-off-policy-steps", "2",
         "--metrics-jsonl", str(tmp_path / "m.jsonl")]
    )  # fmt: skip
    try:
        hist = launch(cfg)
    finally:
        ray.shutdown()
    assert [h["step"] for h in hist] == [0, 1, 2, 3, 4]
    assert [h["rollout/policy_lag"] for h in hist[1:]] == [0.0, 1.0, 2.0, 2.0]
    assert all(h["rollout/policy_lag_max"] <= 2 for h in hist[1:])
    assert [h["rollout/weight_version"] for h in hist[1:]] == [2.0, 3.0, 4.0, 5.0]
    for h in hist[1:]:
        assert math.isfinite(h["train/policy_loss"])


def test_a_bad_ray_config_fails_in_one_line_before_ray_starts():
    from megatron_mtp_rl.config import validate
    from megatron_mtp_rl.errors import ConfigError

    if ray.is_initialized():
        ray.shutdown()
    cfg = parse_config([*FAST, "--ray", "--ray-num-trainers", "2", "--rollout-batch-size", "3"])
    with pytest.raises(ConfigError, match="--rollout-batch-size 3 is not divisible by the data-parallel size 2"):
        launch(cfg)
    assert not ray.is_initialized()
    # PP > 1 generates on the Ray rollout actor (a PP=1 replica), unlike the in-process local engine
    pp2 = parse_config([*FAST, "--ray", "--pipeline-model-parallel-size", "2"])
    assert not any("PP=1 only" in p for p in validate(pp2, 2))
    assert any("PP=1 only" in p for p in validate(parse_config([*FAST, "--pipeline-model-parallel-size", "2"]), 2))


def eval_record(prompt: str, response: str, label) -> float:
    """A reward that depends on the weights (1 when the response's characters sum to an even number: about
    half the answers of a random model), and each (prompt, response) appended to $MTP_RL_TEST_REWARD_LOG."""
    with open(os.environ["MTP_RL_TEST_REWARD_LOG"], "a") as f:
        f.write(json.dumps([prompt, response]) + "\n")
    return float(sum(map(ord, response)) % 2 == 0)


@pytest.mark.slow
def test_step0_eval_with_two_ray_trainers_equals_one(tmp_path, monkeypatch):
    """Rank 1 evaluates with the weights rank 0 pushed (version 1), never with the rollout actor's own
    initial ones (another seed): the held-out answers, so the accuracy, are one trainer's, answer for answer.

    From a 40-step warm start: a random tiny model answers "====" to every prompt, which would hide a
    difference."""
    from megatron_mtp_rl.config import resolve_model_args
    from megatron_mtp_rl.models.generation import SamplingParams
    from megatron_mtp_rl.rollout.ray_engine import RolloutActor
    from megatron_mtp_rl.rollout.tokenizer import build_tokenizer
    from megatron_mtp_rl.train.builders import model_vocab_size
    from megatron_mtp_rl.train.pretrain import run_pretrain

    warm = tmp_path / "warm"
    run_pretrain(parse_config(["--preset", "tiny-dense", "--global-batch-size", "32", "--micro-batch-size", "32",
                               "--seq-length", "16", "--num-steps", "40", "--lr", "3e-3", "--quiet", "--save",
                               str(warm)], "pretrain"))  # fmt: skip
    runs = {}
    for n in (1, 2):
        log = tmp_path / f"eval{n}.jsonl"
        monkeypatch.setenv("MTP_RL_TEST_REWARD_LOG", str(log))  # before Ray starts: its workers inherit it
        cfg = parse_config([*FAST, "--num-steps", "0", "--ray", "--ray-num-trainers", str(n),
                            "--load", str(warm), "--finetune", "--reward-fn", f"{__name__}:eval_record",
                            "--reward-workers", "0"])  # fmt: skip
        try:
            hist = launch(cfg)
            if n == 2:  # what a rank would have answered from the actor's weights before rank 0's push
                tok = build_tokenizer(cfg.data.tokenizer)
                vocab = model_vocab_size(cfg, tok)
                fresh = RolloutActor.options(num_cpus=0).remote(
                    resolve_model_args(cfg, vocab).__dict__, seed=cfg.seed + 1, speculative=False, vocab_size=vocab
                )
                prompts = sorted({json.loads(x)[0] for x in log.read_text().splitlines()})
                enc = [([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(p) for p in prompts]
                greedy = SamplingParams(temperature=0.0, max_new_tokens=cfg.rollout.rollout_max_response_len,
                                        eos_id=tok.eos_id, stop_ids=tuple(getattr(tok, "stop_ids", ())))  # fmt: skip
                done, _ = ray.get(fresh.generate.remote(enc, greedy, 0))
                unpushed = {(p, tok.decode(c.response_ids[:-1] if c.finished and c.response_ids else c.response_ids))
                            for p, c in zip(prompts, done)}  # fmt: skip
        finally:
            ray.shutdown()
        runs[n] = (hist[0], sorted(tuple(json.loads(x)) for x in log.read_text().splitlines()))
    (one, answers1), (two, answers2) = runs[1], runs[2]
    assert len(answers1) == one["eval/num_prompts"] == two["eval/num_prompts"] == 8
    assert answers2 == answers1  # rank 1's half included
    assert two["eval/accuracy"] == one["eval/accuracy"]
    assert 0.0 < one["eval/accuracy"] < 1.0, one  # the reward tells these answers apart
    assert len({r for _, r in answers1}) >= 2, answers1  # not one answer to everything
    assert len(unpushed - set(answers1)) >= 4, unpushed  # other weights give other answers: this can fail
