"""The trainer with --rollout-engine sglang against fake SGLang servers on 127.0.0.1.

The fake implements the subset of SGLang 0.5.23's HTTP schema we use (tests/fake_sglang_server.py)
and rejects unknown fields, so this checks the whole bridge: HF export for the first load,
engines + router start-up, generation through the router, rewards, training, and weight sync
with the MTP (draft) layers after every step.
"""

import json
import sys
import urllib.request
from pathlib import Path

import pytest
import torch

from megatron_mtp_rl.config import parse_config
from megatron_mtp_rl.train.loop import close, prepare
from megatron_mtp_rl.train.step import rl_step
from tests.dist_utils import free_port
from tests.e2e.test_train import FAST

FAKE = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")


def _state(url):
    with urllib.request.urlopen(url + "/_fake/state", timeout=5) as r:
        return json.loads(r.read())


@pytest.mark.parametrize("mode", ["tensor", "distributed", "disk"])
def test_two_steps_through_fake_sglang_with_weight_sync(tmp_path, mode):
    ports = [free_port(span=11), 0, free_port()]  # engines at base and base + 10
    cfg = parse_config(
        [
            *FAST,
            "--preset",
            "tiny-moe",
            "--num-steps",
            "2",
            "--rollout-engine",
            "sglang",
            "--rollout-num-engines",
            "2",
            "--rollout-server-cmd",
            f"{sys.executable} {FAKE} --fake-spec-accept-length 2.5",
            "--rollout-router-cmd",
            f"{sys.executable} {FAKE} --router",
            "--rollout-base-port",
            str(ports[0]),
            "--rollout-router-port",
            str(ports[2]),
            "--rollout-hf-dir",
            str(tmp_path / "hf"),
            "--weight-sync-mode",
            mode,
            "--update-weight-buffer-size",
            str(64 * 1024),
            "--sglang-speculative-algorithm",
            "EAGLE",
            "--sglang-speculative-num-steps",
            "2",
            "--sglang-device",  # the fake stands in for a GPU engine (speculative decoding is GPU-only)
            "cuda",
            "--metrics-jsonl",
            str(tmp_path / "m.jsonl"),
            # disk: the export is the staged copy, so with K = 2 the reload is queued behind the batch in flight
            *(["--max-off-policy-steps", "2"] if mode == "disk" else []),
        ]  # fmt: skip
    )
    ctx, state = prepare(cfg)
    try:
        engine_urls = list(ctx.engine.client.engine_urls)
        hist = []
        for step in (1, 2):
            m, state.cursor = rl_step(ctx, step, state.cursor)
            hist.append(m)
        if ctx.ahead is not None:
            assert ctx.ahead.busy or ctx.engine.version == 2  # the last reload queued, or sent already
            ctx.ahead.wait()
            assert ctx.engine.version == 2
        states = [_state(u) for u in engine_urls]
        # the whole-model payload the sync used to build in one dict: the streamed one must equal it
        from megatron_mtp_rl.cluster.weight_sync import hf_tensors

        sync = ctx.engine.push
        reference = {
            n: float(t.double().sum()) for n, t in hf_tensors(ctx.run.model, ctx.run.model_args, sync.flavour).items()
        }
    finally:
        close(ctx)
    assert (tmp_path / "hf/init/model.safetensors").exists() and (tmp_path / "hf/init/config.json").exists()
    for h in hist:
        assert h["rollout/spec_accept_len"] > 1.0
        assert h["rollout/logprob_abs_diff"] > 0.0  # the engine returned log-probs: measured
    assert [h["rollout/weight_version"] for h in hist] == [1.0, 2.0]
    for st in states:
        assert st["weight_version"] == "2"
        assert st["ignored_fields"] == []  # every /generate field is one SGLang knows (it drops unknown ones)
        routes = [r["route"] for r in st["log"] if not r["route"].startswith(("/health", "/_fake"))]
        assert routes.count("/continue_generation") == 2
        i = routes.index("/pause_generation")
        if mode == "disk":
            assert routes[i : i + 3] == ["/pause_generation", "/flush_cache", "/update_weights_from_disk"]
            assert routes.count("/update_weights_from_disk") == 2
            continue
        # every sync: pause → flush → begin → update… → end → continue
        assert routes[i : i + 3] == ["/pause_generation", "/flush_cache", "/begin_weight_update"]
        route = f"/update_weights_from_{mode}"
        assert routes.count(route) == 2 * hist[0]["rollout/weight_buckets"]
    if mode == "disk":
        assert (tmp_path / "hf/sync/v2/model.safetensors").exists()
        assert not (tmp_path / "hf/sync/v1").exists()  # dropped once the engines held v2
        assert [h["rollout/policy_lag"] for h in hist] == [0.0, 1.0]  # step 1 generated batches 1 and 2
        return
    assert hist[0]["rollout/weight_buckets"] > 1  # 64 KiB buckets: several per sync
    names = [n for b in ctx.engine.push.last_buckets for n in b]
    assert len(names) == len(set(names))  # every tensor exactly once
    assert sorted(names) == sorted(reference)  # the streamed payload is today's, name for name
    limit = 64 * 1024  # --update-weight-buffer-size: a bucket over it holds one tensor alone
    assert all(size <= limit or len(b) == 1 for b, size in zip(sync.last_buckets, sync.last_bucket_bytes))
    assert any(n.startswith("model.layers.2.") and "eh_proj" in n for n in names)  # MTP depth 1 (GLM-4.5 naming)
    # SGLang's Glm4MoeForCausalLMNextN takes one MTP layer: depth 2 is trained, not synced
    assert not any(n.startswith("model.layers.3.") for n in names)
    assert any(n.endswith("mlp.gate.e_score_correction_bias") for n in names)  # GLM's router always has it
    if mode == "distributed":
        for st in states:  # both engines received every tensor of both syncs, in bucket order
            assert [n for n, _ in st["received"]] == names + names
            last = dict(st["received"][len(names) :])
            assert all(abs(last[n] - v) <= 1e-6 * max(1.0, abs(v)) for n, v in reference.items())
            announced = [r["body"] for r in st["log"] if r["route"] == "/update_weights_from_distributed"]
            for body in announced:  # one bucket per announcement, none over the limit unless it is one tensor
                size = sum(
                    torch.empty(shape, dtype=getattr(torch, dt)).nbytes
                    for shape, dt in zip(body["shapes"], body["dtypes"])
                )
                assert size <= limit or len(body["names"]) == 1
    # 2 steps × 4 prompts × 4 samples, eval off: every sample generated exactly once, via the router
    assert sum(st["generate_count"] for st in states) == 2 * 4 * 4


@pytest.mark.slow
def test_r3_through_fake_sglang_replays_the_engine_routes(tmp_path):
    """--use-rollout-routing-replay with SGLang: the engine is started with --enable-return-routed-experts,
    every request asks for the routes, the samples carry them and the trainer replays them."""
    port = free_port()
    cfg = parse_config(
        [
            *FAST,
            "--preset",
            "tiny-moe",
            "--num-steps",
            "1",
            "--rollout-engine",
            "sglang",
            "--rollout-server-cmd",
            f"{sys.executable} {FAKE}",
            "--rollout-base-port",
            str(port),
            "--rollout-hf-dir",
            str(tmp_path / "hf"),
            "--use-rollout-routing-replay",
        ]  # fmt: skip
    )
    ctx, state = prepare(cfg)
    try:
        url = ctx.engine.client.engine_urls[0]
        m, state.cursor = rl_step(ctx, 1, state.cursor)
        st = _state(url)
    finally:
        close(ctx)
    assert "--enable-return-routed-experts" in st["argv"]
    gens = [e["body"] for e in st["log"] if e["route"] == "/generate"]
    assert gens and all(b["return_routed_experts"] and b["routed_experts_start_len"] == 0 for b in gens)
    # the fake's experts are not the model's: the trainer agrees with them on few (token, layer) pairs
    assert 0.0 <= m["rollout/routing_agreement"] < 0.9
    assert m["rollout/mismatch_kl"] >= 0.0
