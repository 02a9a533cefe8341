"""``--rollout-engine-urls``: SGLang servers a cluster's own launcher started (fake ones the test
starts): health-checked, weights pushed to every engine, generation through the router or split
over the engines, and nothing started or stopped by the trainer."""

import json
import urllib.request

import pytest

from megatron_mtp_rl.config import parse_config, validate
from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
from megatron_mtp_rl.train.loop import close, prepare
from megatron_mtp_rl.train.step import rl_step
from tests.e2e.test_train import FAST
from tests.fake_sglang_server import FakeServer


def _state(url):
    with urllib.request.urlopen(url + "/_fake/state", timeout=5) as r:
        return json.loads(r.read())


def _routes(url):
    return [e["route"] for e in _state(url)["log"]]


def test_two_rl_steps_against_a_router_someone_else_started(tmp_path):
    with FakeServer() as e0, FakeServer() as e1, FakeServer(router=True, worker_urls=[e0.url, e1.url]) as router:
        cfg = parse_config([*FAST, "--num-steps", "2", "--rollout-engine", "sglang", "--rollout-engine-urls",
                            router.url, "--rollout-hf-dir", str(tmp_path / "hf")])  # fmt: skip
        ctx, state = prepare(cfg)
        try:
            client = ctx.engine.client
            assert client.generate_url == router.url and client.engine_urls == [e0.url, e1.url]
            hist = []
            for step in (1, 2):
                m, state.cursor = rl_step(ctx, step, state.cursor)
                hist.append(m)
        finally:
            close(ctx)
        # the start push (1) and one per step; every engine got each, the router proxied generation
        assert [h["rollout/weight_version"] for h in hist] == [2.0, 3.0]
        for e in (e0, e1):
            st = _state(e.url)
            assert st["weight_version"] == "3" and st["generate_count"] > 0
            assert _routes(e.url).count("/update_weights_from_tensor") >= 3
        assert _routes(router.url).count("/generate") == sum(_state(e.url)["generate_count"] for e in (e0, e1))
        assert not (tmp_path / "hf" / "init").exists()  # nothing exported for a start of ours
        # close() stopped nothing: the servers still answer
        assert _state(e0.url)["generate_count"] > 0 and _state(router.url)["router"]


def test_engine_urls_without_a_router_split_generation_in_order():
    params = SamplingParams(temperature=1.0, max_new_tokens=3)
    prompts = [[i, i + 1] for i in range(7)]
    with FakeServer() as e0, FakeServer() as e1, FakeServer() as single:
        with SGLangEngine(None, engine_urls=[e0.url, e1.url]) as split, SGLangEngine(single.url) as one:
            got, _ = split.generate(prompts, params, seed=3)
            want, _ = one.generate(prompts, params, seed=3)
        assert [c.response_ids for c in got] == [c.response_ids for c in want]  # same seeds per sample
        assert (_state(e0.url)["generate_count"], _state(e1.url)["generate_count"]) == (3, 4)


def test_engine_urls_config_problems():
    def problems(*extra):
        return validate(parse_config([*FAST, *extra]), 1)

    assert any("needs --rollout-engine sglang" in p for p in problems("--rollout-engine-urls", "http://h:1"))
    assert any("expected http://HOST:PORT" in p for p in problems("--rollout-engine", "sglang",
                                                                   "--rollout-engine-urls", "h:1"))  # fmt: skip
    assert not problems("--rollout-engine", "sglang", "--rollout-engine-urls", "http://h:1,http://h:2")


def test_an_external_engine_that_does_not_answer_is_one_line():
    from megatron_mtp_rl.errors import EngineStartError
    from megatron_mtp_rl.rollout.sglang.external import ExternalEngines
    from tests.dist_utils import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(EngineStartError, match=f"--rollout-engine-urls: {url} does not answer /health after 0.3s"):
        ExternalEngines([url], startup_timeout_s=0.3, poll_s=0.1).start()
