"""Partial rollouts against SGLang: stop once enough groups are done, abort the rest by request id.

Every request is in flight at once (each with its own remaining token budget); as answers come
back the groups whose samples are all done are counted, and once ``stop.count`` are (``stop.required``
among them), every other request is aborted with ``/abort_request`` by the rid of its attempt in flight
(``SGLangClient.abort_base``; rids are prefix-free, as SGLang aborts by prefix: client.attempt_rid).
SGLang 0.5.23 answers an aborted request with HTTP 200, ``finish_reason`` ``{"type": "abort"}`` and
the tokens it had generated, with their log-probs (none while it was in the waiting queue): they
come back as unfinished completions marked ``meta["aborted"]``, which the trainer keeps and continues
at a later step (rollout/partial.py). A request still waiting for a connection when the stop comes
is never sent; one the engine had not received yet when the abort came runs to its end. Either way
every request comes back, complete or carried. A continued sample too long for SGLang to take as input
(:func:`input_too_long`) ends where it stopped, at the length limit, as it would have a few tokens later.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from megatron_mtp_rl.models.sampling_params import GroupStop, SamplingParams
from megatron_mtp_rl.rollout.engine import Completion
from megatron_mtp_rl.rollout.sglang.client import SGLangHTTPError, cancel_on_error


def input_too_long(e: SGLangHTTPError) -> bool:
    """SGLang 0.5.23's refusal of an input of ``min(context length − 1, KV capacity − 1) − 5`` tokens or more
    (``srt/managers/utils.py:validate_input_length``: HTTP 400, "Input length (N tokens) exceeds the maximum
    allowed length (M tokens)"). A fresh request's output is capped silently at that context length − 2
    tokens in all, but a continuation is refused 5 tokens earlier."""
    return e.status == 400 and "exceeds the maximum allowed length" in e.body


async def generate_until(
    clients: list, prompts: list[list[int]], params: SamplingParams, stop: GroupStop, *, seed: int,
    rid_prefix: str, weight_version: int | None = None, routes_start: list[int] | None = None,
) -> list[Completion]:  # fmt: skip
    """Completions in prompt order; requests are dealt to ``clients`` in contiguous shares.
    ``routes_start`` (R3): per prompt, the ``routed_experts_start_len`` to ask for (None: no routes)."""
    n = len(prompts)
    limits = stop.limits or (params.max_new_tokens,) * n
    owner = [clients[i * len(clients) // n] for i in range(n)]
    rids = [f"{rid_prefix}-{i}" for i in range(n)]

    async def one(i: int) -> Completion:
        try:
            return await owner[i].generate(
                prompts[i],
                replace(params, max_new_tokens=max(1, limits[i])),
                rid=rids[i],
                sampling_seed=seed * 1_000_003 + i,
                weight_version=weight_version,
                routed_experts_start_len=routes_start[i] if routes_start is not None else None,
                abortable=True,
            )
        except SGLangHTTPError as e:
            if limits[i] < params.max_new_tokens and input_too_long(e):  # a continuation: it ends here
                return Completion([], [], False, meta={"input_too_long": True})
            raise

    tasks = [asyncio.ensure_future(one(i)) for i in range(n)]
    index = {t: i for i, t in enumerate(tasks)}
    left: dict[int, int] = {}
    for g in stop.groups:
        left[g] = left.get(g, 0) + 1
    done_groups: set[int] = set()
    pending = set(tasks)
    try:
        async with cancel_on_error(tasks):
            while pending and not stop.met(done_groups):
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for t in finished:
                    t.result()  # a request that failed for good fails the call
                    g = stop.groups[index[t]]
                    left[g] -= 1
                    if left[g] == 0:
                        done_groups.add(g)
            if pending:
                await asyncio.gather(*(owner[index[t]].abort_base(rids[index[t]]) for t in pending))
            return list(await asyncio.gather(*tasks))
    finally:
        for i in range(n):
            owner[i].cancelled.discard(rids[i])
