"""Weight sync into the real SGLang 0.5.23 (the session's engine, tests/real_sglang.py), and its control plane.

After each push the engine's prompt log-probs equal the trainer's new weights' (fp32, 1e-4) where they
differed from the weights it served before by far more (a push that did not land fails), its
``meta_info.weight_version`` is the pushed version, and the version rule (rollout/weight_version.py)
holds: an answer from other weights is not taken. Every mode (disk, tensor as file_system shared
memory, distributed over gloo) from one rank; from two gloo ranks with EP=2 (fast) and PP=2 (slow).
Then ``/abort_request`` and ``/pause_generation`` as the bridge uses them, GPU-only requests refused
before the engine is asked, an engine killed mid-run restarted by the supervisor and re-synced, and a
request that kills the engine ending in one line naming it and its log (slow: they restart SGLang).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request

import pytest
import torch

from tests.dist_utils import run_ranks
from tests.e2e.test_real_sglang_families import trainer_prompt_logprobs
from tests.real_sglang import TEST_FLAGS, export_family

FAMILY = "glm4_moe"  # the family the session's engine serves in `make test` (no restart between tests)
PROMPT = [5, 17, 42, 8, 99, 3, 61, 27, 14, 70, 33, 2]
TOL = 1e-4
BUCKET = 64 * 1024  # several buckets per push


def max_diff(a, b) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def perturb(model, seed: int) -> None:
    """Change every weight (the new log-probs differ from the old by far more than TOL)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype))


def served_version(url: str) -> str:
    from megatron_mtp_rl.models.generation import SamplingParams
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine

    with SGLangEngine(url) as eng:
        outs, _ = eng.generate([PROMPT], SamplingParams(max_new_tokens=1, temperature=0.0, eos_id=None), seed=0)
    return outs[0].meta["weight_version"]


def check_version_rule(url: str, version: int) -> None:
    """Answers from ``version`` are taken; a request for the next version waits and gives up, one for the
    previous version is refused (the engine holds newer weights)."""
    from megatron_mtp_rl.models.generation import SamplingParams
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
    from megatron_mtp_rl.rollout.weight_version import WeightVersionError

    params = SamplingParams(max_new_tokens=1, temperature=0.0, eos_id=None)
    with SGLangEngine(url, version_timeout_s=0.5) as eng:
        outs, _ = eng.generate([PROMPT], params, seed=0, weight_version=version)
        assert outs[0].meta["weight_version"] == str(version)
        with pytest.raises(WeightVersionError, match="still"):
            eng.generate([PROMPT], params, seed=0, weight_version=version + 1)
        if version > 1:
            with pytest.raises(WeightVersionError):
                eng.generate([PROMPT], params, seed=0, weight_version=version - 1)


@pytest.mark.sglang
def test_each_sync_mode_lands_on_the_real_engine(single_process, real_sglang, tmp_path):
    from megatron_mtp_rl.cluster.weight_sync import WeightSync
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine

    model_dir, model, margs = export_family(tmp_path, FAMILY, seed=5)
    real_sglang.serve(model_dir, weight_version="0")
    served = real_sglang.prompt_logprobs(PROMPT)
    assert max_diff(served, trainer_prompt_logprobs(model, PROMPT, margs.vocab_size)) <= TOL
    with SGLangEngine(real_sglang.url, control_timeout_s=300) as eng:
        for version, mode in enumerate(["disk", "tensor", "distributed"], start=1):
            perturb(model, seed=version)
            ours = trainer_prompt_logprobs(model, PROMPT, margs.vocab_size)
            assert max_diff(ours, served) > 100 * TOL, "the new weights must be told apart from the served ones"
            sync = WeightSync(eng, model, margs, mode=mode, bucket_bytes=BUCKET, export_dir=str(tmp_path / mode),
                              flavour=FAMILY)  # fmt: skip
            sync.version = version - 1
            metrics = sync()
            served = real_sglang.prompt_logprobs(PROMPT)
            assert max_diff(served, ours) <= TOL, f"{mode}: the push did not land ({max_diff(served, ours):.3g})"
            assert metrics["rollout/weight_version"] == version
            assert mode == "disk" or metrics["rollout/weight_buckets"] > 1
            check_version_rule(real_sglang.url, version)
            if mode == "distributed":
                sync.reset_group()  # our end of the update group, and the engine's
    assert real_sglang.alive()


def _rank_push(rank, world, url, layout, mode, out_dir, version):
    """Build tiny-moe (vocab 100, as the engine serves) on two ranks, push it once, export the same weights."""
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.cluster.weight_sync import WeightSync, export_hf
    from megatron_mtp_rl.hf.export import is_stage_sender
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
    from tests.real_sglang import FAMILY_MODELS

    split = "pipeline_model_parallel_size" if layout == "pp" else "expert_model_parallel_size"
    platform.initialize(platform.ParallelSizes(**{split: world}), seed=11)
    preset, overrides = FAMILY_MODELS[FAMILY]
    margs = get_preset(preset).with_overrides(vocab_size=100, **overrides)
    model = build_model(margs)
    engine = SGLangEngine(url, control_timeout_s=300) if rank == 0 or is_stage_sender() else None
    try:
        sync = WeightSync(engine, model, margs, mode=mode, bucket_bytes=BUCKET, export_dir=f"{out_dir}/push",
                          flavour=FAMILY)  # fmt: skip
        sync.version = version - 1
        metrics = sync()
        if mode == "distributed":
            sync.reset_group()
        export_hf(model, margs, f"{out_dir}/ref", FAMILY)  # the same weights, through the disk path
        # EP: the trainer's own forward on both ranks (a collective); PP would need the pipeline schedule
        ours = trainer_prompt_logprobs(model, PROMPT, margs.vocab_size) if layout == "ep" else None
    finally:
        if engine is not None:
            engine.close()
    names = [n for b in sync.last_buckets for n in b]
    return {"sender": is_stage_sender(), "metrics": metrics, "names": names, "ours": ours}


def check_two_rank_push(real_sglang, tmp_path, layout: str, mode: str, version: int) -> None:
    model_dir = export_family(tmp_path, FAMILY, seed=5)[0]
    real_sglang.serve(model_dir, weight_version=str(version - 1))
    before = real_sglang.prompt_logprobs(PROMPT)
    ranks = run_ranks(_rank_push, 2, tmp_path / "ranks", real_sglang.url, layout, mode, str(tmp_path), version,
                      timeout=400)  # fmt: skip
    served = real_sglang.prompt_logprobs(PROMPT)
    assert served_version(real_sglang.url) == str(version)
    check_version_rule(real_sglang.url, version)
    if layout == "ep":  # the trainer's new weights, by its own forward
        ours = ranks[0]["ours"]
        assert max_diff(ours, before) > 100 * TOL
        assert max_diff(served, ours) <= TOL, f"{layout}/{mode}: the push did not land ({max_diff(served, ours):.3g})"
    # the same weights written by the two ranks' export and loaded from disk: what the push must have given
    real_sglang.serve(tmp_path / "ref")
    ref = real_sglang.prompt_logprobs(PROMPT)
    assert max_diff(ref, before) > 100 * TOL
    assert max_diff(served, ref) <= 1e-6, f"{layout}/{mode}: pushed ≠ exported weights ({max_diff(served, ref):.3g})"
    senders = [r for r in ranks if r["sender"]]
    assert len(senders) == (2 if layout == "pp" else 1)  # PP: each stage's sender pushed its own stage
    if layout == "pp":
        assert not set(senders[0]["names"]) & set(senders[1]["names"])


@pytest.mark.sglang
def test_two_rank_ep_distributed_push_lands_on_the_real_engine(single_process, real_sglang, tmp_path):
    check_two_rank_push(real_sglang, tmp_path, "ep", "distributed", version=4)


@pytest.mark.sglang
@pytest.mark.slow
@pytest.mark.parametrize(("layout", "mode"), [("pp", "distributed"), ("pp", "tensor"), ("ep", "tensor")])
def test_two_rank_push_lands_on_the_real_engine(single_process, real_sglang, tmp_path, layout, mode):
    check_two_rank_push(real_sglang, tmp_path, layout, mode, version=5)


@pytest.mark.sglang
def test_abort_pause_and_gpu_only_refusals_on_the_real_engine(single_process, real_sglang, tmp_path):
    from megatron_mtp_rl.models.generation import SamplingParams
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
    from megatron_mtp_rl.rollout.sglang.gpu_only import GPUOnlyError

    model_dir = export_family(tmp_path, FAMILY, seed=5)[0]
    real_sglang.serve(model_dir)
    long = 64  # within the model's 128 positions: about a second of decoding on 2 cores
    params = SamplingParams(max_new_tokens=long, temperature=0.0, eos_id=None)
    with SGLangEngine(real_sglang.url, backoff_s=0.05, control_timeout_s=120) as eng:
        # /abort_request by rid, as the client sends it for a request past its deadline
        done: dict = {}
        body = {"rid": "abort-me", "input_ids": PROMPT, "return_logprob": True,
                "sampling_params": {"max_new_tokens": long, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip
        t = threading.Thread(target=lambda: done.update(ans=real_sglang.post("/generate", body)))
        t.start()
        deadline = time.monotonic() + 120
        while t.is_alive() and time.monotonic() < deadline:  # an unknown rid is a no-op: ask until it lands
            eng._run(_abort(eng, "abort-me"))
            time.sleep(0.02)
        t.join(120)
        assert done["ans"]["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(done["ans"]["output_ids"]) < long

        # /pause_generation (abort mode) inside a weight-update frame: the running request comes back
        # aborted, the client asks again after /continue_generation and gets the whole answer
        alone, _ = eng.generate([PROMPT], params, seed=0)
        interrupted = 0
        for delay in (0.05, 0.1, 0.2, 0.4):  # how long until the request runs depends on the machine's load
            res: dict = {}
            t = threading.Thread(target=lambda res=res: res.update(out=eng.generate([PROMPT], params, seed=0)))
            t.start()
            time.sleep(delay)
            eng.open_update_frame()
            eng.close_update_frame()
            t.join(120)
            outs, stats = res["out"]
            assert outs[0].response_ids == alone[0].response_ids and len(outs[0].response_ids) == long
            interrupted += stats["rollout/sglang_retries"]
            if interrupted:
                break
        assert interrupted >= 1, "no pause interrupted the running request"

        # GPU-only requests: refused in one line, the engine never asked
        with pytest.raises(GPUOnlyError, match="run on CPU"):
            eng.release_memory()
    assert real_sglang.alive()


async def _abort(eng, rid: str) -> None:
    gen, _ = await eng._clients()
    await gen.abort_request(rid)


@pytest.mark.sglang
@pytest.mark.slow
def test_killed_engine_restarts_resyncs_and_a_killing_request_ends_in_one_line(single_process, real_sglang, tmp_path):
    """The supervisor's own engine (the session's one is stopped meanwhile: one SGLang at a time)."""
    from megatron_mtp_rl.cluster.weight_sync import WeightSync, resync_engine
    from megatron_mtp_rl.rollout.sglang import defaults
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
    from megatron_mtp_rl.rollout.sglang.server import SGLangEngineLost, SGLangServerConfig
    from tests.dist_utils import free_port

    model_dir, model, margs = export_family(tmp_path, FAMILY, seed=5)
    real_sglang.stop()  # the next test that takes the fixture restarts it
    cfg = SGLangServerConfig(
        model_path=str(model_dir),
        port=free_port(),
        server_cmd=defaults.default_server_cmd(),
        engine_flags=defaults.engine_flags(TEST_FLAGS, cpu=True),
        env=defaults.engine_env(cpu=True),
        max_restarts=1,
        startup_timeout_s=600,
        restart_timeout_s=600,
        log_dir=str(tmp_path / "logs"),
    )
    with SGLangEngine.launch(cfg, control_timeout_s=300) as eng:
        sup = eng.supervisor
        sync = WeightSync(eng, model, margs, mode="disk", bucket_bytes=BUCKET, export_dir=str(tmp_path / "push"),
                          flavour=FAMILY)  # fmt: skip
        sup.on_restart = lambda url: resync_engine(sync, url)
        perturb(model, seed=9)
        sync()
        ours = trainer_prompt_logprobs(model, PROMPT, margs.vocab_size)
        url = eng.engine_urls[0]
        assert max_diff(_prompt_logprobs(url), ours) <= TOL
        os.killpg(sup.engines[0].popen.pid, signal.SIGKILL)  # killed mid-run
        deadline = time.monotonic() + 600
        while ("restarted", "engine0") not in [(w, who) for _, w, who in sup.events]:
            assert time.monotonic() < deadline, "the supervisor did not restart the engine"
            time.sleep(0.5)
        assert ("resynced", "engine0") in [(w, who) for _, w, who in sup.events]
        assert max_diff(_prompt_logprobs(url), ours) <= TOL  # the pushed weights, not the initial export's
        assert served_version(url) == "1"
        # a request that kills the engine (sent behind the bridge's back: the bridge refuses it on CPU)
        req = urllib.request.Request(url + "/release_memory_occupation", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with pytest.raises(OSError):
            urllib.request.urlopen(req, timeout=300)
        with pytest.raises(SGLangEngineLost) as e:
            eng.open_update_frame()
        msg = str(e.value)
    assert "\n" not in msg and f"engine0 at {url}" in msg and "engine0.log" in msg, msg


def _prompt_logprobs(url: str) -> list[float]:
    body = {"input_ids": PROMPT, "return_logprob": True, "logprob_start_len": 0,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}}  # fmt: skip
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as r:
        ans = json.loads(r.read())
    return [float(e[0]) for e in ans["meta_info"]["input_token_logprobs"][1:]]
