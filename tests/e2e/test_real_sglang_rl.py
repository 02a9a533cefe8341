"""RL with the real SGLang 0.5.23: 3 steps from a warm start, 2 engines behind the real sglang-router.

The trainer starts everything itself (``--rollout-engine sglang`` and no server command: SGLang's venv
from ``make sglang``, its CPU flags and environment added by the trainer), exports the warm start for the
engines (GLM-4.5, the demo's family), pushes its weights after every step and logs the mismatch between
SGLang's log-probs and its own (fp32 on both sides). The warm start is a short supervised run on
one-digit sums, enough for rollouts to score.
"""

from __future__ import annotations

import json

import pytest

from megatron_mtp_rl.config import parse_config
from tests.dist_utils import free_port

TASK = ["--preset", "tiny-moe", "--arith-digits", "1", "--seq-length", "16", "--seed", "1234", "--quiet"]
RL = [
    "--num-steps", "3", "--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "4",
    "--global-batch-size", "32", "--micro-batch-size", "16", "--num-eval-prompts", "8", "--eval-interval", "100",
    "--lr", "1e-4", "--rollout-engine", "sglang", "--rollout-num-engines", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory) -> str:
    from megatron_mtp_rl.train.pretrain import run_pretrain

    out = tmp_path_factory.mktemp("warm") / "ckpt"
    args = [*TASK, "--num-steps", "40", "--lr", "3e-3", "--global-batch-size", "32", "--micro-batch-size", "32",
            "--num-eval-prompts", "16", "--stop-at-accuracy", "0.15", "--save", str(out)]  # fmt: skip
    run_pretrain(parse_config(args, "pretrain"))
    return str(out)


def rl_run(tmp_path, warm: str, *extra: str) -> list[dict]:
    from megatron_mtp_rl.train.loop import run_training

    base, router = free_port(span=11), free_port()
    args = [*TASK, *RL, "--load", warm, "--rollout-base-port", str(base), "--rollout-router-port", str(router),
            "--rollout-hf-dir", str(tmp_path / "hf"), "--metrics-jsonl", str(tmp_path / "m.jsonl"), *extra]  # fmt: skip
    run_training(parse_config(args))
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    return [r for r in rows if "rollout/accuracy" in r]


def check(rows: list[dict], tmp_path, *, lag_free_only: bool = False) -> None:
    assert len(rows) == 3, rows
    keys = ("rollout/accuracy", "rollout/logprob_abs_diff", "rollout/gen_tokens_per_s")
    for r in rows:
        print("\nstep", r["step"], " ".join(f"{k} {r[k]:.3g}" for k in keys))
    assert max(r["rollout/accuracy"] for r in rows) > 0, [r["rollout/accuracy"] for r in rows]
    for r in rows:
        if lag_free_only and r.get("rollout/policy_lag", 0.0) > 0:
            continue  # one step off-policy: the gap is the policy's change, not the engine's
        assert 0.0 <= r["rollout/logprob_abs_diff"] <= 1e-3, (r["step"], r["rollout/logprob_abs_diff"])
    logs = sorted(p.name for p in (tmp_path / "hf" / "logs").iterdir())
    assert logs == ["engine0.log", "engine1.log", "router.log"], logs


@pytest.mark.sglang
def test_rl_steps_with_two_real_engines_behind_the_router(warm_start, tmp_path):
    rows = rl_run(tmp_path, warm_start, "--weight-sync-mode", "disk")
    check(rows, tmp_path)


@pytest.mark.sglang
@pytest.mark.slow
def test_async_rl_steps_with_two_real_engines_behind_the_router(warm_start, tmp_path):
    rows = rl_run(tmp_path, warm_start, "--weight-sync-mode", "disk", "--async-rollout")
    assert [r["rollout/policy_lag"] for r in rows] == [0.0, 1.0, 1.0]
    check(rows, tmp_path, lag_free_only=True)


@pytest.mark.sglang
@pytest.mark.slow
def test_partial_rollout_steps_with_two_real_engines(warm_start, tmp_path, monkeypatch):
    """--partial-rollout through the trainer and the real engines: 16 groups in flight for 8; once 8 are
    complete the rest are aborted by rid, kept with their tokens and continued at the next step. Every
    sample trains exactly once, complete, with no token newer than the weights it trains from.

    Each engine runs 8 requests at a time (``--sglang-max-running-requests 8``): the warm start answers in
    2-3 tokens, so with every request running at once all would end within a step of each other and the
    abort would rarely find one midway; in waves, the requests after the first complete groups are."""
    from megatron_mtp_rl.train import step as step_module

    trained, pack = [], step_module.pack_minibatches

    def recording_pack(ctx, samples, adv, step, spans=None):
        trained.append((step, list(samples)))
        return pack(ctx, samples, adv, step, spans=spans)

    monkeypatch.setattr(step_module, "pack_minibatches", recording_pack)
    rows = rl_run(tmp_path, warm_start, "--weight-sync-mode", "disk", "--partial-rollout", "--over-sampling-batch-size",
                  "16", "--rollout-temperature", "1.0", "--sglang-max-running-requests", "8")  # fmt: skip
    assert len(rows) == 3, rows
    assert sum(r["rollout/partial_samples"] for r in rows) > 0, rows  # aborted and kept
    assert sum(r["rollout/resumed_samples"] for r in rows) > 0, rows  # continued at a later step
    ids = [id(s) for _, batch in trained for s in batch]
    assert len(ids) == len(set(ids)) == 3 * 32
    for step, batch in trained:
        for s in batch:
            assert not s.aborted and len(s.versions) == len(s.response_ids) == len(s.logprobs)
            assert max(s.versions, default=0) <= step - 1


@pytest.mark.sglang
@pytest.mark.slow
def test_bounded_staleness_with_two_real_engines(warm_start, tmp_path):
    """--max-off-policy-steps 2 with the real engines: step 1 generates batches 1 and 2 from θ_0, step n's
    batch n+2 is generated from θ_{n-1} (the push waits for it), each request naming its weight version."""
    rows = rl_run(tmp_path, warm_start, "--weight-sync-mode", "disk", "--max-off-policy-steps", "2")
    assert [r["rollout/policy_lag"] for r in rows] == [0.0, 1.0, 2.0]
    assert [r["rollout/weight_version"] for r in rows] == [1.0, 2.0, 3.0]  # the engines start from the export
    check(rows, tmp_path, lag_free_only=True)
