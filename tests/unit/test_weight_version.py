"""The weight-version rule (rollout/weight_version.py): a generate request is served only with the
weights it expects — held until the push lands, refused once they are replaced."""

import asyncio
import threading
import time
import urllib.request

import pytest

from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.weight_version import VersionGate, WeightVersionError
from tests.fake_sglang_server import FakeServer


def test_gate_waits_for_the_push_and_refuses_replaced_weights():
    gate = VersionGate()
    threading.Timer(0.2, gate.publish, args=(1,)).start()
    t0 = time.monotonic()
    gate.wait_for(1, timeout_s=10)
    assert time.monotonic() - t0 >= 0.15
    gate.publish(2)
    with pytest.raises(WeightVersionError, match="holds weight version 2, newer than the 1"):
        gate.wait_for(1, timeout_s=10)
    with pytest.raises(WeightVersionError, match="still holds weight version 2 after 0.05s; the request expects 3"):
        gate.wait_for(3, timeout_s=0.05)


def test_ray_replica_serves_a_request_sent_before_the_push_only_after_it(single_process):
    """A second trainer rank's request overtaking rank 0's push waits for it (the replica starts
    from other weights than the trainer's, so serving it early would sample the wrong policy)."""
    from megatron_mtp_rl.hf.mapping import gather_full_state
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.rollout.ray_engine import RolloutReplica

    args = get_preset("tiny-dense")
    trainer = build_model(args.with_overrides(init_method_std=0.3))
    replica = RolloutReplica(args.__dict__, seed=99, speculative=False, vocab_size=args.vocab_size)
    prompts, params = [[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_new_tokens=4)
    early: dict = {}
    waiting = threading.Thread(target=lambda: early.update(out=replica.generate(prompts, params, 0, 1, 30.0)))
    waiting.start()
    time.sleep(0.3)
    assert waiting.is_alive()  # held: the replica has no version 1 yet
    stale = replica.generate(prompts, params, 0)  # (no version named: what it holds now)
    replica.load_weights({k: v.clone() for k, v in gather_full_state(trainer).items()}, 1)
    waiting.join(timeout=30)
    fresh = replica.generate(prompts, params, 0, 1)
    got = [c.response_ids for c in early["out"][0]]
    assert got == [c.response_ids for c in fresh[0]]
    assert [c.logprobs for c in early["out"][0]] == [c.logprobs for c in fresh[0]]
    assert [c.logprobs for c in stale[0]] != [c.logprobs for c in fresh[0]]
    replica.load_weights(gather_full_state(trainer), 2)
    with pytest.raises(WeightVersionError, match="newer than the 1"):
        replica.generate(prompts, params, 0, 1)


def test_sglang_client_drops_answers_from_older_weights_and_refuses_newer():
    from megatron_mtp_rl.rollout.sglang.client import SGLangClient

    params = SamplingParams(temperature=1.0, max_new_tokens=3)

    def push(url, version):
        body = f'{{"model_path": "m", "weight_version": "{version}"}}'.encode()
        req = urllib.request.Request(url + "/update_weights_from_disk", data=body, method="POST")
        req.add_header("Content-Type", "application/json")
        urllib.request.urlopen(req, timeout=5).read()

    async def generate(url, version, **kw):
        async with SGLangClient(url, version_poll_s=0.05, **kw) as c:
            outs = await c.generate_many([[1, 2], [3]], params, seed=0, weight_version=version)
            return outs, c.stats

    with FakeServer() as srv:
        threading.Timer(0.3, push, args=(srv.url, 2)).start()
        outs, stats = asyncio.run(generate(srv.url, 2))
        assert [o.meta["weight_version"] for o in outs] == ["2", "2"]
        assert stats["stale_answers"] >= 2  # answered from "default" first, then asked again
        with pytest.raises(WeightVersionError, match="served with weight version 2, expected 1"):
            asyncio.run(generate(srv.url, 1))
        with pytest.raises(WeightVersionError, match="still served with weight version 2, expected 3 after 0.2s"):
            asyncio.run(generate(srv.url, 3, version_timeout_s=0.2))


def test_a_staged_push_names_its_version_only_once_sent():
    """The Ray actor's push split in two (rollout/engine.py:StagedRemoteEngine): a request made between the
    copy and the send names the weights before the push; one after the send names the new ones."""
    from megatron_mtp_rl.rollout.engine import StagedRemoteEngine

    sent, asked = [], []

    class Client:
        def generate(self, prompts, params, *, seed, weight_version=None):
            asked.append(weight_version)
            return [], {}

    count = [0]

    def stage():
        count[0] += 1
        v = count[0]
        return (lambda: sent.append(v)), {"rollout/weight_version": float(v)}

    eng = StagedRemoteEngine(Client(), stage, name="ray")
    assert eng.sync_weights() == {"rollout/weight_version": 1.0} and sent == [1] and eng.version == 1
    push, metrics = eng.stage_weights()
    assert metrics == {"rollout/weight_version": 2.0} and sent == [1]  # copied, not sent
    eng.generate([[1]], SamplingParams(), seed=0)  # the batch in generation: the weights before the push
    push()
    eng.generate([[1]], SamplingParams(), seed=0)
    assert sent == [1, 2] and asked == [1, 2]
