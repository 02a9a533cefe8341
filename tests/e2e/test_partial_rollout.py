"""--partial-rollout and --max-off-policy-steps through the trainer: buffer, checkpoints, lag bound."""

import pytest

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train import step as step_module
from megatron_mtp_rl.train.loop import run_training

# 6 groups in flight for 1: the first group whose samples all end (EOS) stops the rest
FAST = [
    "--preset", "tiny-dense", "--rollout-batch-size", "1", "--n-samples-per-prompt", "2",
    "--rollout-max-response-len", "16", "--global-batch-size", "2", "--micro-batch-size", "2",
    "--seq-length", "24", "--num-eval-prompts", "2", "--eval-interval", "100", "--lr", "1e-3", "--quiet",
    "--reward-workers", "0", "--partial-rollout", "--over-sampling-batch-size", "6", "--seed", "3",
]  # fmt: skip


def _run(tmp_path, *extra):
    return run_training(parse_config([*FAST, "--metrics-jsonl", str(tmp_path / "m.jsonl"), *extra]))


def _recorded(tmp_path, *extra):
    trained = []
    pack = step_module.pack_minibatches

    def recording_pack(ctx, samples, adv, step, spans=None):
        trained.append((step, list(samples)))
        return pack(ctx, samples, adv, step, spans=spans)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(step_module, "pack_minibatches", recording_pack)
        hist = _run(tmp_path, *extra)
    return hist, trained


def _strip(rows):
    skip = ("perf/", "eval/", "rollout/gen_tokens_per_s", "rollout/weight_version")
    return [{k: v for k, v in r.items() if not k.startswith(skip) and k != "step"} for r in rows]


class _Crash(Exception):
    pass


def test_partial_rollout_trains_each_sample_once_and_resumes_mid_buffer_exactly(tmp_path, monkeypatch):
    straight, trained = _recorded(tmp_path / "a", "--num-steps", "3")
    rows = straight[1:]
    assert sum(r["rollout/partial_samples"] for r in rows) > 0
    assert sum(r["rollout/resumed_samples"] for r in rows) > 0
    ids = [id(s) for _, b in trained for s in b]
    assert len(ids) == len(set(ids)) == 3 * 2
    for step, batch in trained:
        for s in batch:
            assert not s.aborted and len(s.versions) == len(s.response_ids) == len(s.logprobs)
            assert max(s.versions) <= step - 1
    assert any(len(set(s.versions)) > 1 for _, b in trained for s in b)  # continued with newer weights
    # a crash after the step-1 save, whose buffer holds unfinished samples: the resumed run is the same run
    from megatron_mtp_rl.train import loop

    ckpt = str(tmp_path / "ckpt")
    real, done = loop.rl_step, []

    def crash_at_2(ctx, step, cursor):
        if step == 2:
            assert ctx.partial.groups  # mid-buffer
            raise _Crash
        out = real(ctx, step, cursor)
        done.append(out[0])
        return out

    monkeypatch.setattr(loop, "rl_step", crash_at_2)
    with pytest.raises(_Crash):
        _run(tmp_path / "b", "--num-steps", "3", "--save", ckpt, "--save-interval", "1")
    monkeypatch.setattr(loop, "rl_step", real)
    resumed = _run(tmp_path / "b", "--num-steps", "3", "--load", ckpt, "--save", ckpt)
    assert [r["step"] for r in resumed] == [2, 3]
    assert _strip(done + resumed) == _strip(rows)


@pytest.mark.slow
def test_bounded_staleness_never_exceeds_k_and_masks_older_tokens(tmp_path):
    hist, trained = _recorded(
        tmp_path, "--num-steps", "5", "--max-off-policy-steps", "2", "--mask-offpolicy-in-partial-rollout"
    )
    rows = hist[1:]
    assert [r["rollout/policy_lag_max"] <= 2 for r in rows] == [True] * 5
    assert max(r["rollout/policy_lag_max"] for r in rows) == 2.0
    for step, batch in trained:
        for s in batch:
            assert step - 1 - min(s.versions) <= 2
            assert (s.loss_mask or [1] * len(s.versions)) == [int(v >= step - 1) for v in s.versions]
    ids = [id(s) for _, b in trained for s in b]
    assert len(ids) == len(set(ids)) == 5 * 2


@pytest.mark.slow
def test_k1_is_async_rollout(tmp_path):
    common = [x for x in FAST if x not in ("--partial-rollout", "--over-sampling-batch-size", "6")]
    runs = []
    for i, flags in enumerate((["--async-rollout"], ["--max-off-policy-steps", "1"])):
        sizes = ["--rollout-batch-size", "2", "--global-batch-size", "4", "--micro-batch-size", "4"]
        cfg = parse_config(
            [*common, *sizes, "--num-steps", "3", "--metrics-jsonl", str(tmp_path / f"{i}.jsonl"), *flags]
        )
        runs.append(_strip(run_training(cfg)))
    assert runs[0] == runs[1]
    assert [r["rollout/policy_lag"] for r in runs[0][1:]] == [0.0, 1.0, 1.0]


@pytest.mark.slow
def test_partial_rollout_through_fake_sglang_aborts_by_rid(tmp_path):
    """--rollout-engine sglang (the fake server; the real one is not in this suite): the first requests are
    slow, the other groups complete, the slow ones are aborted by rid, kept and continued next step."""
    import json
    import sys
    import urllib.request
    from pathlib import Path

    from megatron_mtp_rl.train.loop import close, prepare
    from megatron_mtp_rl.train.step import rl_step
    from tests.dist_utils import free_port

    fake = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")
    cfg = parse_config(
        [*FAST, "--rollout-batch-size", "2", "--over-sampling-batch-size", "4", "--global-batch-size", "4",
         "--micro-batch-size", "4", "--num-eval-prompts", "0", "--rollout-engine", "sglang",
         "--rollout-server-cmd", f"{sys.executable} {fake} --fake-delay 30 --fake-delay-first-n 2",
         "--rollout-router-cmd", f"{sys.executable} {fake} --router", "--rollout-base-port", str(free_port(span=11)),
         "--rollout-router-port", str(free_port()), "--rollout-hf-dir", str(tmp_path / "hf")]
    )  # fmt: skip
    ctx, state = prepare(cfg)
    try:
        url = ctx.engine.client.engine_urls[0]
        hist = []
        for step in (1, 2, 3):
            m, state.cursor = rl_step(ctx, step, state.cursor)
            hist.append(m)
        with urllib.request.urlopen(url + "/_fake/state", timeout=5) as r:
            st = json.loads(r.read())
    finally:
        close(ctx)
    assert len(st["aborted"]) >= 2  # the two slow requests (and any still running at the stop), by rid
    assert hist[0]["rollout/buffer_size"] >= 2.0  # kept, continued later
    assert all(m["rollout/generated_samples"] == 4.0 for m in hist)


def test_partial_rollout_with_r3_trains_continued_samples_with_one_route_per_token(tmp_path):
    """--partial-rollout with --use-rollout-routing-replay (tiny-moe, local engine): samples continued
    across steps reach the trainer with one route row per input token, and the old pass replays them."""
    import math

    hist, trained = _recorded(tmp_path, "--preset", "tiny-moe", "--use-rollout-routing-replay", "--num-steps", "3")
    rows = hist[1:]
    assert sum(r["rollout/resumed_samples"] for r in rows) > 0
    continued = 0
    for _, batch in trained:
        for s in batch:
            assert s.routes is not None and s.routes.shape[0] == len(s.prompt_ids) + len(s.response_ids) - 1
            continued += len(set(s.versions)) > 1
    assert continued > 0
    for r in rows:
        assert 0.0 < r["rollout/routing_agreement"] <= 1.0  # the old pass saw the engine's routes
        assert math.isfinite(r["train/policy_loss"])


@pytest.mark.slow
def test_partial_rollout_with_r3_through_fake_sglang(tmp_path, monkeypatch):
    """R3 with --partial-rollout against SGLang (the fake server, whose experts follow a fixed rule): the
    stop path asks for routes, the two slow requests are aborted (answered empty, no routes) and asked
    again at the next step, and every trained sample carries one route row per input token."""
    import sys
    from pathlib import Path

    from megatron_mtp_rl.train.loop import close, prepare
    from megatron_mtp_rl.train.step import rl_step
    from tests.dist_utils import free_port

    trained = []
    pack = step_module.pack_minibatches

    def recording_pack(ctx, samples, adv, step, spans=None):
        trained.extend(samples)
        return pack(ctx, samples, adv, step, spans=spans)

    monkeypatch.setattr(step_module, "pack_minibatches", recording_pack)
    fake = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")
    cfg = parse_config(
        [*FAST, "--preset", "tiny-moe", "--use-rollout-routing-replay", "--rollout-batch-size", "2",
         "--over-sampling-batch-size", "4", "--global-batch-size", "4", "--micro-batch-size", "4",
         "--num-eval-prompts", "0", "--rollout-engine", "sglang",
         "--rollout-server-cmd", f"{sys.executable} {fake} --fake-delay 30 --fake-delay-first-n 2",
         "--rollout-base-port", str(free_port(span=11)), "--rollout-hf-dir", str(tmp_path / "hf")]
    )  # fmt: skip
    ctx, state = prepare(cfg)
    try:
        hist = []
        for step in (1, 2, 3):
            m, state.cursor = rl_step(ctx, step, state.cursor)
            hist.append(m)
    finally:
        close(ctx)
    assert hist[0]["rollout/buffer_size"] >= 2.0  # the slow two, aborted (the fake answers them empty) and kept
    assert len(trained) == 3 * 4
    for s in trained:
        assert s.routes is not None and s.routes.shape[0] == len(s.prompt_ids) + len(s.response_ids) - 1
    assert all(0.0 <= m["rollout/routing_agreement"] <= 1.0 for m in hist)
