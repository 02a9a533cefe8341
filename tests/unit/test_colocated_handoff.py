"""The colocated hand-off against a fake SGLang engine: per step the engine sees resume → generate →
release → resume(weights) → update, refuses generation while released, and the trainer's memory is
away exactly while the engine generates."""

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest

from megatron_mtp_rl.cluster.colocated import ColocatedEngine, generation_phase
from megatron_mtp_rl.cluster.offload import TrainerOffload
from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.engine import RemoteEngine
from megatron_mtp_rl.rollout.sglang.client import SGLangHTTPError
from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
from tests.fake_sglang_server import FakeServer
from tests.unit.test_offload import _model_and_optimizer

HERE = str(Path(__file__).parent)  # a directory the fake engine can "load"


def _log(url):
    with urllib.request.urlopen(url + "/_fake/state", timeout=5) as r:
        return json.loads(r.read())["log"]


def test_one_step_order_and_no_generation_while_released(single_process):
    model, optimizer = _model_and_optimizer()
    trainer = TrainerOffload(model, optimizer)
    params = SamplingParams(temperature=1.0, max_new_tokens=2)
    with FakeServer() as srv, SGLangEngine(srv.url) as client:
        version = [0]

        def push():
            version[0] += 1
            assert not trainer.offloaded  # the push reads the trainer's weights

            async def update(clients):
                await asyncio.gather(
                    *(c.update_weights_from_disk(HERE, weight_version=str(version[0])) for c in clients)
                )

            client.pause_flush_update_continue(update, weight_update_session=False)
            return {"rollout/weight_version": float(version[0])}

        engine = ColocatedEngine(RemoteEngine(client, push, name="sglang"), trainer, client, barrier=lambda: None)
        for _ in range(2):
            with generation_phase(engine) as handoff:
                assert trainer.offloaded  # the trainer stepped aside
                engine.generate([[1, 2], [3]], params, seed=0)
            assert not trainer.offloaded and set(handoff) >= {
                "perf/trainer_offload_time", "perf/engine_resume_time", "perf/engine_release_time",
                "perf/trainer_onload_time"}  # fmt: skip
            # the per-side GPU footprints are measured on CUDA only (tests/gpu), never reported as 0 here
            assert not {"perf/trainer_gpu_peak_gb", "perf/engine_gpu_gb"} & set(handoff)
            with pytest.raises(SGLangHTTPError, match="memory released"):  # released: refused
                client.generate([[1]], params, seed=0)
            metrics = engine.sync_weights()
            assert not trainer.offloaded and "perf/engine_weights_resume_time" in metrics
        calls = [(e["route"], tuple((e["body"] or {}).get("tags") or ())) for e in _log(srv.url)]
    kept = {"/resume_memory_occupation", "/release_memory_occupation", "/generate", "/update_weights_from_disk"}
    order = []
    for route, tags in calls:
        if route in kept and not (order and order[-1][0] == route == "/generate"):
            order.append((route, tags))
    step = [
        ("/generate", ()),  # (the engines start with their memory: nothing to resume at the first step)
        ("/release_memory_occupation", ("weights", "kv_cache")),
        ("/generate", ()),  # the refused one
        ("/resume_memory_occupation", ("weights",)),
        ("/update_weights_from_disk", ()),
    ]
    assert order[:5] == step
    assert order[5:] == [("/resume_memory_occupation", ("kv_cache",)), *step[:2], *step[2:]]
