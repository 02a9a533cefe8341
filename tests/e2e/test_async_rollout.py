"""--async-rollout: the local engine in a child process generates step n+1 while step n trains."""

import math
import threading

import pytest

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.rollout.async_rollout import OneStepAhead
from megatron_mtp_rl.train import step as step_module
from megatron_mtp_rl.train.loop import run_training

FAST = [
    "--preset", "tiny-dense", "--rollout-batch-size", "4", "--n-samples-per-prompt", "4",
    "--rollout-max-response-len", "4", "--global-batch-size", "8", "--micro-batch-size", "8",
    "--seq-length", "16", "--num-eval-prompts", "4", "--eval-interval", "100", "--lr", "1e-3", "--quiet",
    "--async-rollout",
]  # fmt: skip


def _run(tmp_path, *extra):
    return run_training(parse_config([*FAST, "--metrics-jsonl", str(tmp_path / "m.jsonl"), *extra]))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """One uninterrupted async run of 4 steps, recording what was generated and what was trained."""
    generated, trained = [], []
    take, pack = OneStepAhead.take, step_module.pack_minibatches

    def recording_take(self, step):
        out = take(self, step)
        generated.append((step, list(out[0].samples)))  # the objects: alive, so their ids stay unique
        return out

    def recording_pack(ctx, samples, adv, step, spans=None):
        trained.append((step, list(samples)))
        return pack(ctx, samples, adv, step, spans=spans)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(OneStepAhead, "take", recording_take)
        mp.setattr(step_module, "pack_minibatches", recording_pack)
        sent = _pipe_requests(mp)
        hist = _run(tmp_path_factory.mktemp("straight"), "--num-steps", "4")
    return hist, generated, trained, sent


def _pipe_requests(monkeypatch) -> list[tuple[str, str]]:
    """(request, thread) of every request the trainer sends the rollout process, in order."""
    from megatron_mtp_rl.rollout.process_engine import ProcessEngine

    sent, ask = [], ProcessEngine._ask

    def recording_ask(self, *msg):
        out = ask(self, *msg)
        sent.append((msg[0], threading.current_thread().name))
        return out

    monkeypatch.setattr(ProcessEngine, "_ask", recording_ask)
    return sent


def test_async_run_trains_every_sample_once_one_step_off_policy(straight):
    hist, generated, trained, _ = straight
    assert [h["step"] for h in hist] == [0, 1, 2, 3, 4]
    # Staleness: the first batch comes from θ_0, every later one from the weights one step old.
    assert [h["rollout/policy_lag"] for h in hist[1:]] == [0.0, 1.0, 1.0, 1.0]
    # Four batches generated (none for a fifth step), each trained exactly once, at its own step.
    assert [s for s, _ in generated] == [1, 2, 3, 4]
    assert [(s, [id(x) for x in b]) for s, b in generated] == [(s, [id(x) for x in b]) for s, b in trained]
    ids = [id(x) for _, batch in trained for x in batch]
    assert len(ids) == len(set(ids)) == 4 * 16
    for row in hist[1:]:
        for k in ("train/policy_loss", "train/grad_norm", "rollout/reward_mean", "train/param_norm_main"):
            assert math.isfinite(row[k]), (k, row[k])
    assert hist[4]["rollout/weight_version"] == 5.0  # the initial push + one per step


def _strip(rows):
    skip = ("perf/", "eval/", "rollout/gen_tokens_per_s", "rollout/weight_version")
    return [{k: v for k, v in r.items() if not k.startswith(skip) and k != "step"} for r in rows]


class _Crash(Exception):
    pass


@pytest.mark.slow  # resume with pending batches: test_trainer_state_ranks stays fast
def test_async_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, straight):
    from megatron_mtp_rl.train import loop

    ckpt = str(tmp_path / "ckpt")
    real = loop.rl_step
    done = []

    def crash_at_3(ctx, step, cursor):
        if step == 3:
            raise _Crash  # the checkpoint of step 2 holds the batch generated for step 3
        out = real(ctx, step, cursor)
        done.append(out[0])
        return out

    monkeypatch.setattr(loop, "rl_step", crash_at_3)
    with pytest.raises(_Crash):
        _run(tmp_path / "b", "--num-steps", "4", "--save", ckpt, "--save-interval", "2")
    monkeypatch.setattr(loop, "rl_step", real)
    resumed = _run(tmp_path / "b", "--num-steps", "4", "--load", ckpt, "--save", ckpt)
    assert [r["step"] for r in resumed] == [3, 4]
    assert _strip(done + resumed) == _strip(straight[0][1:])
    assert resumed[0]["rollout/policy_lag"] == 1.0  # the saved batch was trained, not regenerated


def test_weight_push_is_queued_behind_the_batch_in_flight_and_changes_nothing(tmp_path, monkeypatch, straight):
    """The trainer stages θ_n and goes on; a rollout thread pushes it once batch n+1 is generated. The
    requests reach the rollout process in the order of the run whose push waits, with the same results."""
    hist, _, _, sent = straight
    order = [kind for kind, _ in sent]
    # initial push, eval (step 0), batch 1, then per step: batch n+1 (none after step 3) and the push of θ_n;
    # the final eval once the queue is done
    assert order == ["weights", "generate", "generate", "generate", "weights", "generate", "weights", "generate",
                     "weights", "weights", "generate", "close"]  # fmt: skip
    pushes = [thread for kind, thread in sent if kind == "weights"]
    assert pushes[0] == "MainThread" and all(t == "rollout-weights" for t in pushes[1:]), pushes
    waited_sent = _pipe_requests(monkeypatch)
    monkeypatch.setattr(step_module, "staged_push", lambda ctx: False)  # the push waits for the batch
    waited = _run(tmp_path, "--num-steps", "4")
    assert [kind for kind, _ in waited_sent] == order
    assert all(t == "MainThread" for kind, t in waited_sent if kind == "weights")
    assert _strip(hist) == _strip(waited)
    assert all(r["perf/rollout_wait_time"] >= 0 for r in hist[1:])
