"""The SGLang rollout bridge against a loopback fake, schema-checked against sglang 0.5.23.

Field names, routes and CLI flags come from ``tests/fixtures/sglang_io_struct_fields.json``,
extracted from the sglang 0.5.23 and sglang-router 0.3.2 wheels by
``tools/check_sglang_schema.py``; the fake server (``tests/fake_sglang_server.py``) rejects
anything outside them with HTTP 400. SGLang itself is not installed: nothing here needs a GPU
or the network, and every server binds 127.0.0.1 and is stopped by its test.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import io
import json
import os
import pickle
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.sglang import schema as S
from megatron_mtp_rl.rollout.sglang.client import (
    SGLangClient,
    SGLangHTTPError,
    SGLangRetriesExhausted,
    serialize_named_tensors,
)
from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
from megatron_mtp_rl.rollout.sglang.server import SGLangServerConfig, SGLangSupervisor, split_passthrough_args
from tests.fake_sglang_server import FakeServer

ROOT = Path(__file__).resolve().parents[2]
FAKE = str(ROOT / "tests" / "fake_sglang_server.py")
SCHEMA = json.loads((ROOT / "tests" / "fixtures" / "sglang_io_struct_fields.json").read_text())


def run(coro):
    return asyncio.run(coro)


def free_ports(n: int) -> list[int]:
    """Distinct free ports below the ephemeral range (see tests/dist_utils.free_port)."""
    from tests.dist_utils import free_port

    ports: list[int] = []
    while len(ports) < n:
        p = free_port()
        if p not in ports:
            ports.append(p)
    return ports


def fake_state(url: str) -> dict:
    with urllib.request.urlopen(url + "/_fake/state", timeout=5) as r:
        return json.loads(r.read())


def post(url: str, body) -> int:
    req = urllib.request.Request(url, json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


# -- schema ---------------------------------------------------------------------------------


def test_fixture_is_the_checked_version():
    assert SCHEMA["sglang_version"] == S.SGLANG_VERSION == "0.5.23"
    assert SCHEMA["sglang_router_version"] == S.SGLANG_ROUTER_VERSION == "0.3.2"
    spec = importlib.util.spec_from_file_location("check_sglang_schema", ROOT / "tools" / "check_sglang_schema.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.problems_with_our_usage(SCHEMA) == []  # every field/route we use exists in the wheel


def test_generate_payload_fields_are_sglang_fields_and_accepted():
    p = S.build_generate_payload(
        [1, 2, 3], SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, eos_id=2), rid="r1"
    )
    assert set(p) <= set(SCHEMA["request_classes"]["GenerateReqInput"])
    assert set(p["sampling_params"]) <= set(SCHEMA["api_contract"]["SamplingParams"])  # SGLang rejects extras
    assert p["return_logprob"] is True and p["stream"] is False and p["rid"] == "r1"
    assert p["sampling_params"] == {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "stop_token_ids": [2]}
    q = S.build_generate_payload([4], SamplingParams(temperature=0, eos_id=None), rid="r2", sampling_seed=-1)
    assert q["sampling_params"]["ignore_eos"] is True and "stop_token_ids" not in q["sampling_params"]
    assert 0 <= q["sampling_params"]["sampling_seed"] < 2**63
    with FakeServer() as srv:
        assert post(srv.url + "/generate", p) == 200
        assert post(srv.url + "/generate", q) == 200
        # drift shows: SGLang 0.5.23 drops an unknown top-level field (200; the fake notes it) and
        # refuses an unknown sampling field (400)
        assert post(srv.url + "/generate", {**p, "rid": "r3", "bogus": 1}) == 200
        assert srv.state.ignored_fields == ["bogus"]
        bad_sp = {**p, "rid": "r4", "sampling_params": {**p["sampling_params"], "eos_id": 2}}
        assert post(srv.url + "/generate", bad_sp) == 400
        assert post(srv.url + "/abort_request", {"rid": "x", "nope": True}) == 400


def test_parse_generate_response():
    meta = {
        "id": "a",
        "finish_reason": {"type": "stop", "matched": 7},
        "prompt_tokens": 3,
        "completion_tokens": 3,
        "output_token_logprobs": [[-0.5, 4, None], [-1.0, 5, None], [-0.1, 7, None]],
        "spec_verify_ct": 2,
        "spec_accept_length": 1.5,
    }
    c = S.parse_generate_response({"text": "", "output_ids": [4, 5, 7], "meta_info": meta}, rid="a")
    assert c.response_ids == [4, 5, 7] and c.logprobs == [-0.5, -1.0, -0.1] and c.finished
    assert c.meta["spec_accept_length"] == 1.5 and c.meta["spec_verify_ct"] == 2 and c.meta["matched"] == 7
    length = {**meta, "finish_reason": {"type": "length", "length": 3}}
    assert not S.parse_generate_response({"output_ids": [4, 5, 7], "meta_info": length}).finished
    # output_ids may be absent (then the logprob entries' ids are used)
    assert S.parse_generate_response({"meta_info": length}).response_ids == [4, 5, 7]
    with pytest.raises(S.SGLangAbortedError):
        S.parse_generate_response({"output_ids": [], "meta_info": {**meta, "finish_reason": {"type": "abort"}}})
    with pytest.raises(S.SGLangResponseError, match="disagree"):
        S.parse_generate_response({"output_ids": [4, 5], "meta_info": meta})
    with pytest.raises(S.SGLangResponseError, match="output_token_logprobs"):
        S.parse_generate_response({"output_ids": [4], "meta_info": {"id": "a", "finish_reason": {"type": "length"}}})
    with pytest.raises(S.SGLangResponseError, match="expected"):
        S.parse_generate_response({"output_ids": [4, 5, 7], "meta_info": meta}, rid="b")


# -- client ---------------------------------------------------------------------------------


def test_client_timeout_aborts_then_retries():
    async def go(url):
        async with SGLangClient(url, request_timeout_s=0.3, backoff_s=0.01, max_retries=2) as c:
            return await c.generate([1, 2], SamplingParams(max_new_tokens=4), rid="slow")

    with FakeServer(delay=5.0, delay_first_n=1) as srv:
        t0 = time.monotonic()
        out = run(go(srv.url))
        assert time.monotonic() - t0 < 3.0
        st = srv.state.snapshot()
    assert out.meta["attempts"] == 2 and len(out.response_ids) == 4
    assert st["aborted"] == ["slow/0.0"]  # the timed-out attempt was aborted by its rid
    gens = [e["body"]["rid"] for e in st["log"] if e["route"] == "/generate"]
    assert gens == ["slow/0.0", "slow/1.0"]  # ... and retried under a fresh rid
    t_abort = next(e["t"] for e in st["log"] if e["route"] == "/abort_request")
    t_retry = next(e["t"] for e in st["log"] if e["route"] == "/generate" and e["body"]["rid"] == "slow/1.0")
    assert t_abort <= t_retry


def test_client_retries_are_bounded_with_a_clear_error():
    async def go(url, **kw):
        async with SGLangClient(url, backoff_s=0.01, max_retries=2, **kw) as c:
            return await c.generate([3], SamplingParams(max_new_tokens=2), rid="r")

    with FakeServer(fail_first_n=100, fail_status=503) as srv:
        with pytest.raises(SGLangRetriesExhausted, match=r"failed 3 times for rid r.*HTTP 503"):
            run(go(srv.url))
        assert srv.state.generate_count == 3
    with FakeServer(fail_first_n=1, fail_status=503) as srv:  # a transient failure is absorbed
        assert run(go(srv.url)).meta["attempts"] == 2
    with FakeServer(fail_first_n=100, fail_status=400) as srv:  # a client error is not retried
        with pytest.raises(SGLangHTTPError, match="HTTP 400"):
            run(go(srv.url))
        assert srv.state.generate_count == 1
    with FakeServer(fail_first_n=1, fail_status=400, delay=5.0) as srv:  # one hard failure cancels the rest

        async def many(url):
            async with SGLangClient(url) as c:
                return await c.generate_many([[1], [2], [3]], SamplingParams(max_new_tokens=2), seed=0)

        t0 = time.monotonic()
        with pytest.raises(SGLangHTTPError):
            run(many(srv.url))
        assert time.monotonic() - t0 < 3.0
    port = free_ports(1)[0]  # nothing listening: connection errors, retried, then reported
    with pytest.raises(SGLangRetriesExhausted, match="Client"):
        run(go(f"http://127.0.0.1:{port}"))


def test_client_concurrency_limit():
    async def go(url):
        async with SGLangClient(url, max_concurrency=3) as c:
            return await c.generate_many([[i] for i in range(12)], SamplingParams(max_new_tokens=3), seed=0)

    with FakeServer(delay=0.1) as srv:
        outs = run(go(srv.url))
        assert srv.state.max_inflight == 3
    assert [o.meta["rid"].rsplit("-", 1)[1].split("/")[0] for o in outs] == [str(i) for i in range(12)]  # prompt order


def test_tensor_payload_uses_only_globals_sglang_unpickles():
    allowed = {tuple(x) for x in SCHEMA["safe_unpickler_allowed_globals"]}

    class Restricted(pickle.Unpickler):  # what SGLang's SafeUnpickler lets through
        def find_class(self, module, name):
            if (module, name) not in allowed:
                raise pickle.UnpicklingError(f"SGLang would block {module}.{name}")
            return super().find_class(module, name)

    named = [("model.layers.0.mlp.weight", torch.arange(6.0).reshape(2, 3)), ("mtp.0.norm", torch.ones(4).bfloat16())]
    data = serialize_named_tensors(named)
    raw = base64.b64decode(data, validate=True)
    # file_system sharing: a named shared-memory file (the default fd strategy kills SGLang's scheduler)
    assert b"rebuild_storage_filename" in raw and b"DupFd" not in raw
    out = Restricted(io.BytesIO(raw)).load()
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, a), (_, b) in zip(out, named):
        assert torch.equal(a, b) and a.dtype == b.dtype


# -- engine ---------------------------------------------------------------------------------


def test_engine_generate_stats_and_sync_weights():
    with FakeServer(spec_accept_length=2.5) as srv, SGLangEngine(srv.url) as eng:
        prompts = [[1, 2, 3], [9], [4, 4]]
        outs, stats = eng.generate(prompts, SamplingParams(max_new_tokens=6, eos_id=None), seed=3)
        outs2, _ = eng.generate(prompts, SamplingParams(max_new_tokens=6, eos_id=None), seed=3)
        with pytest.raises(NotImplementedError, match="not implemented yet"):
            eng.sync_weights()
    assert [len(o.response_ids) for o in outs] == [6, 6, 6] and not any(o.finished for o in outs)
    assert [o.response_ids for o in outs] == [o.response_ids for o in outs2]  # same seed, same fake tokens
    assert stats["rollout/gen_tokens_per_s"] > 0
    assert stats["rollout/spec_accept_len"] == pytest.approx(18 / sum(o.meta["spec_verify_ct"] for o in outs))
    with FakeServer() as srv, SGLangEngine(srv.url) as eng:  # no speculative meta → no accept-length stat
        assert "rollout/spec_accept_len" not in eng.generate([[1]], SamplingParams(max_new_tokens=2), seed=0)[1]


def test_pause_flush_update_continue_order():
    expected = [
        "/pause_generation",
        "/flush_cache",
        "/begin_weight_update",
        "/update_weights_from_tensor",
        "/end_weight_update",
        "/continue_generation",
    ]
    with FakeServer() as a, FakeServer() as b, SGLangEngine(a.url, engine_urls=[a.url, b.url]) as eng:

        async def update(clients):
            w = [("lm_head.weight", torch.zeros(2, 2))]
            return await asyncio.gather(*(c.update_weights_from_tensor(w, weight_version="v1") for c in clients))

        res = eng.pause_flush_update_continue(update)
        assert [r["success"] for r in res] == [True, True]
        for srv in (a, b):
            assert [e["route"] for e in srv.state.log] == expected
            assert not srv.state.paused.is_set() and not srv.state.session_open

        async def failing(clients):
            await clients[0].update_weights_from_disk(str(ROOT), weight_version="v2")  # a directory: the fake loads it
            raise RuntimeError("sync broke")

        with pytest.raises(RuntimeError, match="sync broke"):
            eng.pause_flush_update_continue(failing, weight_update_session=False)
        routes = [e["route"] for e in a.state.log[len(expected) :]]
        assert routes == ["/pause_generation", "/flush_cache", "/update_weights_from_disk", "/continue_generation"]
        assert not a.state.paused.is_set()  # never left paused
        # 0.5.23 refuses a tensor update outside a session; the fake mirrors that
        with pytest.raises(SGLangHTTPError, match="begin_weight_update"):
            eng.pause_flush_update_continue(
                lambda cs: cs[0].update_weights_from_tensor([("w", torch.zeros(1))]), weight_update_session=False
            )


# -- supervisor -----------------------------------------------------------------------------


def test_passthrough_flags_and_commands():
    argv = [
        "--num-steps",
        "3",
        "--sglang-mem-fraction-static",
        "0.8",
        "--sglang-speculative-algorithm",
        "EAGLE",
        "--sglang-speculative-num-steps",
        "3",
        "--sglang-speculative-eagle-topk",
        "1",
        "--sglang-speculative-num-draft-tokens",
        "4",
        "--sglang-enable-deterministic-inference",
        "--sglang-router-policy",
        "round_robin",
        "--sglang-log-level=warning",
        "--seed",
        "-1",
    ]
    engine, router, rest = split_passthrough_args(argv)
    assert engine == [
        "--mem-fraction-static",
        "0.8",
        "--speculative-algorithm",
        "EAGLE",
        "--speculative-num-steps",
        "3",
        "--speculative-eagle-topk",
        "1",
        "--speculative-num-draft-tokens",
        "4",
        "--enable-deterministic-inference",
        "--log-level=warning",
    ]
    assert router == ["--policy", "round_robin"]
    assert rest == ["--num-steps", "3", "--seed", "-1"]
    cfg = SGLangServerConfig.from_argv("/ckpt/hf", argv, num_engines=2, tp_size=2, port=31000, router_port=31100)
    sup = SGLangSupervisor(cfg)
    cmd0, cmd1, rcmd = sup.engine_command(0), sup.engine_command(1), sup.router_command()
    assert cmd0[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert cmd0[3:] == ["--model-path", "/ckpt/hf", "--host", "127.0.0.1", "--port", "31000", "--tp-size", "2"] + [
        "--base-gpu-id",
        "0",
        *engine,
    ]
    assert cmd1[cmd1.index("--port") + 1] == "31010" and cmd1[cmd1.index("--base-gpu-id") + 1] == "2"
    assert rcmd[:3] == [sys.executable, "-m", "sglang_router.launch_router"]
    assert rcmd[3:] == ["--host", "127.0.0.1", "--port", "31100", "--worker-urls"] + sup.engine_urls + router
    flags = lambda c: {t.split("=")[0] for t in c if t.startswith("--")}  # noqa: E731
    assert flags(cmd0) <= set(SCHEMA["launch_server_flags"])  # every flag exists in sglang 0.5.23
    assert flags(rcmd) <= set(SCHEMA["router_flags"])
    assert sup.generate_url == "http://127.0.0.1:31100" and sup.router_url == sup.generate_url


def _fake_config(tmp_path, num_engines=2, **kw) -> SGLangServerConfig:
    p0, p1, pr = free_ports(3)
    return SGLangServerConfig(
        model_path="fake-model",
        num_engines=num_engines,
        port=p0,
        port_stride=p1 - p0,
        router_port=pr,
        engine_flags=["--mem-fraction-static", "0.5"],
        server_cmd=[sys.executable, FAKE, "--fake-startup-delay", "0.4"],
        router_cmd=[sys.executable, FAKE, "--router", "--fake-health-interval", "0.05"],
        startup_timeout_s=20,
        restart_timeout_s=20,
        health_poll_s=0.05,
        watch_interval_s=0.1,
        log_dir=str(tmp_path),
        **kw,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_supervisor_starts_router_after_engines_are_healthy(tmp_path):
    cfg = _fake_config(tmp_path)
    sup = SGLangSupervisor(cfg).start()
    try:
        ev = [(what, who) for _, what, who in sup.events]
        assert ev == [
            ("start", "engine0"),
            ("start", "engine1"),
            ("healthy", "engine0"),
            ("healthy", "engine1"),
            ("start", "router"),
            ("healthy", "router"),
        ]
        router = fake_state(sup.router_url)
        assert router["workers_healthy_at_start"] == {u: True for u in sup.engine_urls}
        e0 = fake_state(sup.engine_urls[0])
        assert "--mem-fraction-static" in e0["argv"] and "--base-gpu-id" in e0["argv"]
        assert e0["env"]["SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION"] == "false"  # /health must not stall on pause
        with SGLangEngine(sup.generate_url, engine_urls=sup.engine_urls) as eng:
            outs, _ = eng.generate([[1], [2], [3], [4]], SamplingParams(max_new_tokens=3), seed=0)
        assert len(outs) == 4
        assert all(fake_state(u)["generate_count"] == 2 for u in sup.engine_urls)  # the router spread them
        pids = [p.popen.pid for p in [*sup.engines, sup.router]]
    finally:
        sup.close()
    assert not any(_alive(pid) for pid in pids)


def test_supervisor_fails_fast_when_an_engine_cannot_start(tmp_path):
    cfg = _fake_config(tmp_path, num_engines=1, use_router=False)
    cfg.engine_flags = ["--no-such-sglang-flag", "1"]  # the fake rejects flags sglang 0.5.23 lacks
    sup = SGLangSupervisor(cfg)
    with pytest.raises(Exception, match=r"engine0 exited with code 2.*no-such-sglang-flag"):
        sup.start()
    assert sup.engines[0].popen.poll() is not None


def test_supervisor_restarts_a_killed_engine_and_reregisters_it(tmp_path):
    eng = SGLangEngine.launch(_fake_config(tmp_path), request_timeout_s=10, backoff_s=0.05)
    sup = eng.supervisor
    try:
        e0 = sup.engines[0]
        old = e0.popen.pid
        os.killpg(old, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and ("registered", "engine0") not in [(w, who) for _, w, who in sup.events]:
            time.sleep(0.05)
        assert e0.popen.pid != old and e0.popen.poll() is None and e0.restarts == 1
        whats = [(w, who) for _, w, who in sup.events]
        # died → restarted → registered again with the router (the fake router evicts a worker
        # that fails its health check, as sglang-router may)
        assert whats.index(("died", "engine0")) < whats.index(("restarted", "engine0"))
        assert whats.index(("restarted", "engine0")) < whats.index(("registered", "engine0"))
        assert e0.url in {w["url"] for w in fake_state(sup.router_url)["workers"]}
        assert len(eng.generate([[5], [6]], SamplingParams(max_new_tokens=2), seed=1)[0]) == 2
        assert fake_state(e0.url)["generate_count"] >= 1  # the restarted engine serves again
        # explicit reconciliation: a worker the router dropped is registered again
        with urllib.request.urlopen(sup.router_url + "/workers", timeout=5) as r:
            wid = next(w["id"] for w in json.loads(r.read())["workers"] if w["url"] == sup.engines[1].url)
        urllib.request.urlopen(urllib.request.Request(sup.router_url + f"/workers/{wid}", method="DELETE"), timeout=5)
        sup._stop.set()  # stop the watcher so the explicit call below is the one that registers
        sup._watcher.join(timeout=5)
        assert sup.sync_router() == [sup.engines[1].url]
        pids = [p.popen.pid for p in [*sup.engines, sup.router]]
    finally:
        eng.close()  # the engine launched the servers, so it stops them
    assert not any(_alive(pid) for pid in pids)


def test_supervisor_gives_up_after_max_restarts(tmp_path):
    from megatron_mtp_rl.rollout.sglang.server import SGLangServerError

    eng = SGLangEngine.launch(_fake_config(tmp_path, num_engines=1, use_router=False, max_restarts=0))
    try:
        os.killpg(eng.supervisor.engines[0].popen.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not eng.supervisor.engines[0].failed:
            time.sleep(0.05)
        with pytest.raises(SGLangServerError, match="could not be restarted"):
            eng.generate([[1]], SamplingParams(max_new_tokens=2), seed=0)  # a clear error, not a hang
    finally:
        eng.close()
