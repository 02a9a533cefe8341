"""Partial rollouts (``--partial-rollout``) against the real SGLang 0.5.23 (the session's engine).

Greedy, the same weights: a request stopped partway, by a smaller token budget or by ``/abort_request``
once enough groups are done (``generate_until`` through ``SGLangEngine.generate(stop=...)``), then
continued from its prompt and its tokens so far with the rest of its budget, gives the tokens and
log-probs of one uninterrupted generation; every request comes back complete or carried; a group the stop
requires runs to its end. Aborting one
request leaves a request whose rid extends its rid alone (SGLang aborts by rid prefix). Through the
trainer's partial-rollout buffer (rollout/partial.py) over several steps: every sample trains exactly once,
with the tokens of an uninterrupted generation. The tiny random model repeats a prompt's last token, so
the log-probs, which change with every position, are what tell a wrong continuation apart.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from dataclasses import replace

import pytest

from tests.real_sglang import export_family

FAMILY = "glm4_moe"  # the model the other real-engine tests serve: a reload, no restart
PROMPTS = [[5, 17, 42, 8, 99, 3, 61, 27, 14, 70, 33, 2], [9, 4, 77, 31, 58, 12, 90, 6, 41], [23, 8, 64, 15, 88, 37, 50],
           [71, 2, 19, 96, 44, 30, 7, 83]]  # fmt: skip
N = 48  # new tokens of a whole sample (prompt + N within the model's 128 positions)
LONG = 40  # the request left running (streamed: about 2 s) while another is aborted
TOL = 1e-4


def check_continues(whole, head: list[int], head_lps: list[float], tail) -> None:
    """head + tail = the uninterrupted tokens; their log-probs too (fp32, TOL)."""
    assert head + tail.response_ids == whole.response_ids
    lps = head_lps + tail.logprobs
    assert max(abs(a - b) for a, b in zip(lps, whole.logprobs, strict=True)) <= TOL


@pytest.mark.sglang
def test_stopped_requests_continue_to_the_uninterrupted_tokens_on_the_real_engine(single_process, real_sglang,
                                                                                  tmp_path):  # fmt: skip
    from megatron_mtp_rl.models.sampling_params import GroupStop, SamplingParams
    from megatron_mtp_rl.rollout.sglang.client import attempt_rid
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine

    model_dir = export_family(tmp_path, FAMILY, seed=5)[0]
    real_sglang.serve(model_dir)
    params = SamplingParams(max_new_tokens=N, temperature=0.0, eos_id=None)
    with SGLangEngine(real_sglang.url, backoff_s=0.05) as eng:
        whole, _ = eng.generate(PROMPTS, params, seed=0)
        assert all(len(w.response_ids) == N for w in whole)

        # stopped by a smaller budget, then continued with the rest of it
        k = 7
        head, _ = eng.generate(PROMPTS, replace(params, max_new_tokens=k), seed=0)
        more = [p + h.response_ids for p, h in zip(PROMPTS, head)]
        tail, _ = eng.generate(more, replace(params, max_new_tokens=N - k), seed=0)
        for w, h, t in zip(whole, head, tail):
            check_continues(w, h.response_ids, h.logprobs, t)

        # stopped by the abort once one group is done: group 0 needs one token, the others N
        samples = [0, 0, 1, 1, 2, 2, 3, 3]  # GRPO groups: two samples of each prompt
        limits = tuple(1 if g == 0 else N for g in samples)
        stop = GroupStop(groups=tuple(samples), count=1, limits=limits)
        outs, _ = eng.generate([PROMPTS[g] for g in samples], params, seed=0, stop=stop)
        assert len(outs) == len(samples)
        carried = [i for i, o in enumerate(outs) if o.meta.get("aborted")]
        for i, o in enumerate(outs):  # each one complete, or carried with fewer tokens than its budget
            assert (not o.finished) and (len(o.response_ids) < limits[i] if i in carried else
                                         len(o.response_ids) == limits[i])  # fmt: skip
        assert carried and set(carried) <= set(range(2, len(samples))), carried
        assert outs[0].response_ids == whole[0].response_ids[:1]
        # a required group (one a further carry would make too old to train) holds the stop until it is done
        short = tuple(1 if g == 0 else 8 for g in samples)  # 8 tokens are enough to tell, and cheaper than N
        held, _ = eng.generate([PROMPTS[g] for g in samples], params, seed=0,
                               stop=replace(stop, limits=short, required=(3,)))  # fmt: skip
        assert [o.response_ids for o in held[6:]] == [whole[3].response_ids[:8]] * 2
        assert not any(o.meta.get("aborted") for o in held[6:]) and held[0].response_ids == outs[0].response_ids
        # continued, each with the rest of its budget (its own group: none is stopped this time)
        more = [PROMPTS[samples[i]] + outs[i].response_ids for i in carried]
        rest = GroupStop(groups=tuple(range(len(carried))), count=len(carried),
                         limits=tuple(N - len(outs[i].response_ids) for i in carried))  # fmt: skip
        tails, _ = eng.generate(more, params, seed=0, stop=rest)
        for i, t in zip(carried, tails, strict=True):
            assert not t.meta.get("aborted")
            check_continues(whole[samples[i]], outs[i].response_ids, outs[i].logprobs, t)

        # aborting "x-1" leaves "x-10" alone (SGLang's scheduler aborts by rid prefix): "x-10" streams,
        # so it is known to be running when "x-1" is sent and aborted
        first, last = threading.Event(), {}
        t = threading.Thread(target=_stream, args=(real_sglang.url, attempt_rid("x-10"), PROMPTS[1], LONG, first, last))
        t.start()
        assert first.wait(120), "x-10 did not start"
        a = eng._run(_aborted(eng, params))
        t.join(120)
        assert a.meta.get("aborted") and a.meta.get("finish_reason") == "abort" and len(a.response_ids) < N
        assert last["meta_info"]["finish_reason"]["type"] == "length", last["meta_info"]["finish_reason"]
        assert last["meta_info"]["completion_tokens"] == LONG
    assert real_sglang.alive()


def _stream(url: str, rid: str, prompt: list[int], n: int, first: threading.Event, last: dict) -> None:
    """A streamed greedy /generate: ``first`` set at its first chunk, ``last`` its last chunk."""
    body = {"rid": rid, "input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": n, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {"):
                last.clear()
                last.update(json.loads(line[6:]))
                first.set()


async def _aborted(eng, params):
    """One request "x-1" through the client, aborted (abort_base) once sent, as soon as the engine holds it."""
    gen, _ = await eng._clients()
    a = asyncio.ensure_future(gen.generate(PROMPTS[0], params, rid="x-1", abortable=True))
    deadline = time.monotonic() + 120
    try:
        while gen.in_flight("x-1") is None and not a.done():
            await asyncio.sleep(0.001)
        while not a.done() and time.monotonic() < deadline:  # an abort before the engine holds the rid is lost
            await gen.abort_base("x-1")
            await asyncio.sleep(0.02)
        return await a
    finally:
        gen.cancelled.discard("x-1")


class _Ids:
    """Prompts are token ids written out ("5 17 42"): the served model's own vocabulary."""

    bos_id = None

    def encode(self, text: str) -> list[int]:
        return [int(t) for t in text.split()]

    def decode(self, ids) -> str:
        return " ".join(map(str, ids))


class _Scorer:
    class stats:  # noqa: N801 (the scorer's counters, as RolloutManager reads them)
        errors = 0

    def score(self, items) -> list[float]:
        return [float(len(resp.split())) for _, resp, _ in items]


@pytest.mark.sglang
def test_partial_rollout_buffer_on_the_real_engine_trains_every_sample_once(single_process, real_sglang, tmp_path):
    """Greedy, EOS = 2: the tiny model repeats a prompt's last token, so a prompt ending in 2 is done after one
    token and the others run to the budget; each step's first such group stops the rest, carried to later steps."""
    from megatron_mtp_rl.models.sampling_params import SamplingParams
    from megatron_mtp_rl.rollout.data import Prompt
    from megatron_mtp_rl.rollout.manager import RolloutManager
    from megatron_mtp_rl.rollout.partial import PartialRollout
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine

    model_dir = export_family(tmp_path, FAMILY, seed=5)[0]
    real_sglang.serve(model_dir)
    params = SamplingParams(max_new_tokens=N, temperature=0.0, eos_id=2)
    order = [1, 2, 0, 3, 0, 1, 0, 2, 0, 3, 0, 0]  # PROMPTS[0] ends in 2 (EOS); the others do not
    steps = 6
    with SGLangEngine(real_sglang.url, backoff_s=0.05) as eng:
        whole, _ = eng.generate(PROMPTS, params, seed=0)
        assert whole[0].response_ids == [2] and whole[0].finished
        assert all(len(w.response_ids) == N and not w.finished for w in whole[1:])
        manager = RolloutManager(eng, _Ids(), _Scorer(), n_samples=2, sampling=params)
        pr = PartialRollout(over_sampling=3)
        cursor = [0]

        def fetch(count):
            out = [Prompt(" ".join(map(str, PROMPTS[order[cursor[0] + k]])), None, cursor[0] + k) for k in range(count)]
            cursor[0] += count
            return out

        batches = [pr(manager, fetch, num_prompts=1, seed=step, version=0) for step in range(1, steps + 1)]
    trained = [s for b in batches for s in b.samples]
    assert len(trained) == 2 * steps and len({id(s) for s in trained}) == len(trained)  # each trains once
    assert len({s.prompt.index for s in trained}) == steps  # whole groups, none twice
    for s in trained:  # the tokens and log-probs of one uninterrupted generation
        w = whole[PROMPTS.index([int(t) for t in s.prompt.text.split()])]
        assert s.response_ids == w.response_ids and s.versions == [0] * len(w.response_ids)
        assert max(abs(a - b) for a, b in zip(s.logprobs, w.logprobs, strict=True)) <= TOL
    assert batches[0].metrics["rollout/partial_samples"] >= 4.0  # step 1: two groups stopped by the first
    assert sum(b.metrics["rollout/resumed_samples"] for b in batches) > 0
    # what is still in flight was consumed, never trained: the buffer holds the rest of the fetched groups
    left = {g[0].prompt.index for g in pr.groups}
    assert left.isdisjoint(s.prompt.index for s in trained) and len(left) + steps == cursor[0]
