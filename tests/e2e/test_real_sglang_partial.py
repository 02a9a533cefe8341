"""Partial rollouts (``--partial-rollout``) against the real SGLang 0.5.23 (the session's engine).

Greedy, the same weights: a request stopped partway, by a smaller token budget or by ``/abort_request``
once enough groups are done (``generate_until`` through ``SGLangEngine.generate(stop=...)``), then
continued from its prompt and its tokens so far with the rest of its budget, gives the tokens and
log-probs of one uninterrupted generation; every request comes back complete or carried. Aborting one
request leaves a request whose rid extends its rid alone (SGLang aborts by rid prefix).
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
LONG = 110  # the request left running while another is aborted
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
        more = [PROMPTS[samples[i]] + outs[i].response_ids for i in carried]
        for i, rest in zip(carried, [N - len(outs[i].response_ids) for i in carried]):
            tail, _ = eng.generate([more[carried.index(i)]], replace(params, max_new_tokens=rest), seed=0)
            check_continues(whole[samples[i]], outs[i].response_ids, outs[i].logprobs, tail[0])

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
