"""Partial rollouts: stop between decoding steps, continue later, train each sample once."""

import copy
from dataclasses import replace

import pytest
import torch

from megatron_mtp_rl.models.generation import GroupStop, SamplingParams, generate
from megatron_mtp_rl.rollout.data import Prompt
from megatron_mtp_rl.rollout.engine import Completion
from megatron_mtp_rl.rollout.manager import RolloutManager
from megatron_mtp_rl.rollout.partial import PartialRollout

EOS = 1


class _Stats:
    errors = 0


class _Scorer:
    stats = _Stats()

    def score(self, items):
        return [float(len(resp.split())) for _, resp, _ in items]  # rewards differ between samples


class _Tok:
    bos_id = None

    def encode(self, text):
        return [int(text), 7]  # [length of the answer, marker]

    def decode(self, ids):
        return " ".join(map(str, ids))


class _StepEngine:
    """Decodes one token per live row per step: the answer to [L, 7] is 100, 101, ..., then EOS at
    length L, whatever was generated before (a deterministic 'model'); honours GroupStop."""

    remote = False

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, *, seed, stop=None):
        self.calls.append(len(prompts))
        n = len(prompts)
        limits = list(stop.limits) if stop else [params.max_new_tokens] * n
        out = [[] for _ in range(n)]
        done = [False] * n
        while not all(done):
            for i, p in enumerate(prompts):
                if done[i]:
                    continue
                pos = len(p) - 2 + len(out[i])  # position in the whole response
                out[i].append(EOS if pos == p[0] - 1 else 100 + pos)
                done[i] = out[i][-1] == EOS or len(out[i]) >= limits[i]
            if stop is not None:
                groups = {}
                for g, d in zip(stop.groups, done):
                    groups[g] = groups.get(g, True) and d
                if stop.met({g for g, d in groups.items() if d}):
                    break
        return [
            Completion(o, [-0.5] * len(o), bool(o) and o[-1] == EOS, meta={} if d else {"aborted": True})
            for o, d in zip(out, done)
        ], {}


LENGTHS = [2, 6, 9, 3, 5, 2, 8, 4, 3, 7, 2, 2, 5, 3, 6, 2, 4, 2]


def _fetch_from(cursor):
    def fetch(count):
        out = [Prompt(str(LENGTHS[(cursor[0] + k) % len(LENGTHS)]), None, cursor[0] + k) for k in range(count)]
        cursor[0] += count
        return out

    return fetch


def _manager(max_new=8, n=2):
    return RolloutManager(
        _StepEngine(), _Tok(), _Scorer(), n_samples=n, sampling=SamplingParams(max_new_tokens=max_new, eos_id=EOS)
    )


def _steps(pr, manager, steps, start=1, cursor=None, **kw):
    cursor = cursor or [0]
    batches = []
    for step in range(start, start + steps):
        batches.append(pr(manager, _fetch_from(cursor), num_prompts=1, seed=step, version=step - 1, **kw))
    return batches, cursor


def test_samples_stop_continue_with_new_weights_and_train_once():
    manager = _manager()
    pr = PartialRollout(over_sampling=3)
    batches, _ = _steps(pr, manager, 8)
    first = batches[0]
    # step 1: groups of lengths 2, 6, 9 in flight; the first complete group ends generation after 2 steps
    assert [len(s.response_ids) for s in first.samples] == [2, 2]
    assert first.metrics["rollout/partial_samples"] == 4.0  # the 6- and 9-long groups, stopped at 2 tokens
    assert first.metrics["rollout/buffer_size"] == 4.0
    trained = [s for b in batches for s in b.samples]
    assert len({id(s) for s in trained}) == len(trained)  # every sample trains once
    assert all(len(b.samples) == 2 and b.samples[0].prompt is b.samples[1].prompt for b in batches)
    resumed = [s for s in trained if len(set(s.versions)) > 1]
    assert resumed and sum(b.metrics["rollout/resumed_samples"] for b in batches) >= len(resumed)
    for step, b in enumerate(batches, start=1):
        for s in b.samples:
            n = min(int(s.prompt.text), 8)
            # the continued tokens are those of one uninterrupted generation
            assert s.response_ids == [100 + i for i in range(n - 1)] + (
                [EOS] if n == int(s.prompt.text) else [100 + n - 1]
            )
            assert s.versions == sorted(s.versions) and max(s.versions) <= step - 1
            assert len(s.logprobs) == len(s.response_ids)
            assert s.loss_mask is None
        old = sum(v < step - 1 for s in b.samples for v in s.versions)
        assert b.metrics["rollout/offpolicy_token_fraction"] == pytest.approx(
            old / sum(len(s.versions) for s in b.samples)
        )
        assert b.metrics["rollout/policy_lag_max"] == max(step - 1 - min(s.versions) for s in b.samples)


def test_mask_offpolicy_masks_exactly_the_older_tokens():
    manager = _manager()
    pr = PartialRollout(over_sampling=3, mask_offpolicy=True)
    batches, _ = _steps(pr, manager, 6)
    seen = 0
    for step, b in enumerate(batches, start=1):
        for s in b.samples:
            expect = [int(v >= step - 1) for v in s.versions]
            if 0 in expect:
                seen += 1
                assert s.loss_mask == expect
            else:
                assert s.loss_mask is None
    assert seen > 0


def test_resume_mid_buffer_is_exact():
    pr = PartialRollout(over_sampling=3)
    straight, _ = _steps(pr, _manager(), 7)
    pr2 = PartialRollout(over_sampling=3)
    head, cursor = _steps(pr2, _manager(), 3)
    saved = copy.deepcopy((pr2.state_dict(), cursor))
    assert saved[0]["groups"]  # unfinished samples in the buffer
    pr3 = PartialRollout(over_sampling=3)
    pr3.load_state_dict(saved[0])
    tail, _ = _steps(pr3, _manager(), 4, start=4, cursor=list(saved[1]))

    def view(bs):
        return [[(s.prompt.index, s.response_ids, s.versions, s.reward) for s in b.samples] for b in bs]

    assert view(head + tail) == view(straight)


def test_a_group_on_its_last_chance_finishes_instead_of_going_stale():
    """max_lag=1: a group carried once would be too old to train if carried again, so the stop waits for it;
    nothing is dropped as stale or wasted, and no trained sample is more than one version old."""
    pr = PartialRollout(over_sampling=2, max_lag=1)
    batches, _ = _steps(pr, _manager(max_new=9, n=1), 12)
    assert sum(b.metrics["rollout/last_chance_groups"] for b in batches) > 0
    assert sum(b.metrics["rollout/stale_dropped"] + b.metrics["rollout/wasted_tokens"] for b in batches) == 0
    assert sum(b.metrics["rollout/resumed_samples"] for b in batches) > 0
    for step, b in enumerate(batches, start=1):
        assert all(step - 1 - min(s.versions) <= 1 for s in b.samples)
    # without the bound the same run carries a group over twice (lag 2)
    free, _ = _steps(PartialRollout(over_sampling=2), _manager(max_new=9, n=1), 12)
    assert max(b.metrics["rollout/policy_lag_max"] for b in free) >= 2
    # more groups in flight than two steps can train: the stop waits for no more of them than one step trains
    over, _ = _steps(PartialRollout(over_sampling=4, max_lag=1), _manager(max_new=9), 6)
    assert 0 < max(b.metrics["rollout/last_chance_groups"] for b in over) <= 1


def test_stale_groups_are_dropped_and_counted():
    """A buffer with tokens older than the bound (here: loaded from a run with a looser one) is dropped."""
    manager = _manager(max_new=9)
    warm = PartialRollout(over_sampling=4)
    _steps(warm, manager, 2)
    old = [g for g in warm.groups if any(s.response_ids for s in g)]
    assert old
    pr = PartialRollout(over_sampling=4, max_lag=1)
    pr.load_state_dict(warm.state_dict())
    (b,), _ = _steps(pr, manager, 1, start=5, cursor=[40])
    assert b.metrics["rollout/stale_dropped"] == sum(len(g) for g in old)
    assert b.metrics["rollout/wasted_tokens"] == sum(len(s.response_ids) for g in old for s in g)
    assert all(4 - min(s.versions) <= 1 for s in b.samples)


@pytest.mark.parametrize("speculative", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_aborted_generation_continues_to_the_uninterrupted_tokens(single_process, speculative):
    """A real model (greedy): rows stopped by a GroupStop, continued from prompt + their tokens with
    the same weights, give the tokens of one uninterrupted generation."""
    from megatron_mtp_rl.models import build_model, get_preset

    torch.manual_seed(0)
    model = build_model(get_preset("tiny-dense").with_overrides(init_method_std=0.3))
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3], [11, 3], [3, 3, 6]]
    sp = SamplingParams(temperature=0, max_new_tokens=10)
    full = generate(model, prompts, sp, vocab_size=60, speculative=speculative)
    # group 0 (rows 0, 1) needs 2 tokens, group 1 (rows 2, 3) 10: one group done stops everything
    stop = GroupStop(groups=(0, 0, 1, 1), count=1, limits=(2, 2, 10, 10))
    part = generate(model, prompts, sp, vocab_size=60, stop=stop, speculative=speculative)
    assert part.aborted[:2] == [False, False] and part.aborted[2:] == [True, True]
    assert [len(r) for r in part.responses[:2]] == [2, 2]
    assert all(len(r) < 10 for r in part.responses[2:])
    rest = [prompts[i] + part.responses[i] for i in (2, 3)]
    more = generate(
        model,
        rest,
        sp,
        vocab_size=60,
        stop=GroupStop((0, 0), 1, tuple(10 - len(part.responses[i]) for i in (2, 3))),
        speculative=speculative,
    )
    for k, i in enumerate((2, 3)):
        assert part.responses[i] + more.responses[k] == full.responses[i]
        assert part.responses[i] + more.responses[k] != []
    assert part.responses[:2] == [r[:2] for r in full.responses[:2]]
    # a required group holds the stop until it is done too: nothing is aborted here
    held = generate(model, prompts, sp, vocab_size=60, speculative=speculative, stop=replace(stop, required=(1,)))
    assert held.aborted == [False] * 4 and held.responses[2:] == full.responses[2:]


class _IdsTok:
    bos_id = None

    def encode(self, text):
        return [int(t) for t in text.split()]

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.mark.parametrize("new_weights", [False, True])
def test_continued_samples_carry_the_routes_of_one_uninterrupted_generation(single_process, new_weights):
    """R3 with partial rollouts, a real MoE model and the local engine (greedy): samples stopped at one
    step and continued at later ones train with the tokens and the per-token routes of one
    uninterrupted generation. With other weights after the stop (``new_weights``: the routers
    flipped), the earlier tokens keep the routes they were generated with, and the rest are those
    of the new weights continuing from them."""
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.models.provider import RuntimeOptions
    from megatron_mtp_rl.models.routing_replay import trunk_routers
    from megatron_mtp_rl.rollout.local_engine import LocalEngine

    torch.manual_seed(0)
    model = build_model(
        get_preset("tiny-moe").with_overrides(init_method_std=0.3), runtime=RuntimeOptions(routing_replay=True)
    )
    engine = LocalEngine(model, vocab_size=model.real_vocab_size, record_routes=True)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3], [11, 3], [3, 3, 6]]
    probe, _ = engine.generate(prompts[:1], SamplingParams(temperature=0, max_new_tokens=2), seed=0)
    eos = probe[0].response_ids[1]  # prompt 0 ends after 2 tokens: one group done early, the rest stopped
    assert probe[0].response_ids[0] != eos
    sp = SamplingParams(temperature=0, max_new_tokens=10, eos_id=eos)
    full, _ = engine.generate(prompts, sp, seed=0)
    assert [len(c.response_ids) for c in full][0] == 2 and min(len(c.response_ids) for c in full[1:]) > 2

    cursor = [0]

    def fetch(count):  # the four prompts, then them again (new groups, never compared)
        out = [Prompt(" ".join(map(str, prompts[(cursor[0] + k) % 4])), None, cursor[0] + k) for k in range(count)]
        cursor[0] += count
        return out

    manager = RolloutManager(engine, _IdsTok(), _Scorer(), n_samples=1, sampling=sp)
    pr = PartialRollout(over_sampling=4)
    trained = {}
    for step in range(1, 9):
        b = pr(manager, fetch, num_prompts=1, seed=step, version=step - 1)
        trained.update({s.prompt.index: s for s in b.samples if s.prompt.index < 4})
        if step == 1:
            assert b.metrics["rollout/partial_samples"] == 3.0  # prompts 1..3 stopped after 2 tokens
            assert all(s.routes is not None and s.routes.shape[0] == len(s.prompt_ids) + 1 for g in pr.groups
                       for s in g)  # fmt: skip
            if new_weights:
                with torch.no_grad():
                    for layer in model.decoder.layers:
                        layer.mlp.router.weight.neg_()
                assert trunk_routers(model)
                rest = SamplingParams(temperature=0, max_new_tokens=8, eos_id=eos)  # the 10-token cap, 2 made
                cont, _ = engine.generate([prompts[i] + full[i].response_ids[:2] for i in (1, 2, 3)], rest, seed=0)
                for i, c in zip((1, 2, 3), cont):
                    head = len(prompts[i]) + 1  # the rows recorded at step 1
                    full[i].response_ids = full[i].response_ids[:2] + c.response_ids
                    full[i].routes = torch.cat([full[i].routes[:head], c.routes[head:]])
                    assert not torch.equal(c.routes[:head], full[i].routes[:head])  # the new weights route otherwise
    assert sorted(trained) == [0, 1, 2, 3]
    assert sum(len(set(s.versions)) > 1 for s in trained.values()) >= 2  # continued across steps
    for i, s in trained.items():
        assert s.response_ids == full[i].response_ids
        assert s.routes.dtype == full[i].routes.dtype
        assert s.routes.shape == (len(prompts[i]) + len(s.response_ids) - 1, *full[i].routes.shape[1:])
        assert torch.equal(s.routes, full[i].routes)


def test_continued_routes_joins_full_or_appended_rows():
    """The engine answers every input position (local) or only the new ones (SGLang asked from the
    end of the known rows); both give the same sample; an answer without routes keeps the known ones."""
    from megatron_mtp_rl.rollout.partial import continued_routes

    whole = torch.arange(9 * 2).view(9, 1, 2).to(torch.uint8)  # prompt 4 + 6 tokens − 1
    prev = whole[:5] + 0  # prompt 4 + the first 2 tokens − 1
    other = whole + 100  # the continuation's own rows of the known positions (e.g. a re-prefill)
    assert torch.equal(continued_routes(prev, torch.cat([other[:5], whole[5:]]), 6, 4), whole)
    assert torch.equal(continued_routes(prev, whole[5:], 6, 4), whole)
    assert continued_routes(prev, None, 6, 0) is prev
    assert torch.equal(continued_routes(None, whole, 6, 4), whole)
    assert torch.equal(continued_routes(prev[:3], other[:9], 6, 4), torch.cat([prev[:3], other[3:9]]))
    with pytest.raises(ValueError, match="expected 9 or 4"):
        continued_routes(prev, whole[6:], 6, 4)


def test_sglang_stop_aborts_the_rest_by_request_id():
    """Against the fake SGLang server (the real one is not in this suite): one request is slow, the
    other's group completes, the slow one is aborted by its rid and comes back unfinished."""
    import asyncio
    import time

    from megatron_mtp_rl.rollout.sglang import schema as S
    from megatron_mtp_rl.rollout.sglang.client import SGLangClient
    from megatron_mtp_rl.rollout.sglang.partial import generate_until
    from tests.fake_sglang_server import FakeServer

    async def go(url):
        async with SGLangClient(url, backoff_s=0.01) as c:
            stop = GroupStop(groups=(0, 1), count=1, limits=(4, 3))
            return await generate_until([c], [[1, 2], [3, 4]], SamplingParams(max_new_tokens=6), stop, seed=1,
                                        rid_prefix="p")  # fmt: skip

    with FakeServer(delay=20.0, delay_first_n=1) as srv:
        t0 = time.monotonic()
        outs = asyncio.run(go(srv.url))
        assert time.monotonic() - t0 < 10.0
        st = srv.state.snapshot()
    aborted = [i for i, o in enumerate(outs) if o.meta.get("aborted")]
    assert len(aborted) == 1 and st["aborted"] == [f"p-{aborted[0]}/0.0"]  # its attempt in flight
    assert outs[aborted[0]].response_ids == [] and not outs[aborted[0]].finished
    done = 1 - aborted[0]
    assert len(outs[done].response_ids) == (4, 3)[done]  # each request's own remaining budget
    # SGLang's answer to an aborted request carries the tokens it had: they are kept
    meta = {"id": "r", "finish_reason": {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None},
            "output_token_logprobs": [[-0.1, 5, None], [-0.2, 6, None]], "weight_version": "3"}  # fmt: skip
    body = {"output_ids": [5, 6], "meta_info": meta}
    c = S.parse_generate_response(body, rid="r", partial_ok=True, stops=(9,))
    assert (c.response_ids, c.logprobs, c.finished, c.meta["aborted"]) == ([5, 6], [-0.1, -0.2], False, True)
    assert c.meta["weight_version"] == "3"
    # the abort wins over a stop token decoded in the same step: the sample ends there, finished
    c = S.parse_generate_response(body, rid="r", partial_ok=True, stops=(5,))
    assert (c.response_ids, c.logprobs, c.finished, c.meta.get("aborted")) == ([5], [-0.1], True, None)
    with pytest.raises(S.SGLangResponseError, match="disagree"):
        S.parse_generate_response(dict(body, output_ids=[5, 7]), rid="r", partial_ok=True)
    with pytest.raises(S.SGLangAbortedError):
        S.parse_generate_response(body, rid="r")


def test_sglang_continuation_too_long_for_the_engine_ends_at_the_length_limit():
    """SGLang 0.5.23 refuses an input of context − 6 tokens or more (HTTP 400) and caps a request at context − 2
    tokens in all (the fake does the same): a continued sample it would refuse ends where it stopped,
    unfinished; a fresh prompt that long is the user's error and fails the call."""
    import asyncio

    from megatron_mtp_rl.rollout.sglang.client import SGLangClient, SGLangHTTPError
    from megatron_mtp_rl.rollout.sglang.partial import generate_until
    from tests.fake_sglang_server import FakeServer

    params = SamplingParams(max_new_tokens=12)

    async def go(url, prompts, limits):
        async with SGLangClient(url, backoff_s=0.01) as c:
            stop = GroupStop(groups=tuple(range(len(prompts))), count=len(prompts), limits=limits)
            return await generate_until([c], prompts, params, stop, seed=1, rid_prefix="p")

    with FakeServer(context_length=16) as srv:
        fresh, continued = [1, 2, 3, 4, 5, 6], list(range(1, 11))  # 6 and 10 input tokens
        outs = asyncio.run(go(srv.url, [fresh, continued], (12, 3)))
        assert len(outs[0].response_ids) == 16 - 1 - 6 - 1  # capped by the context
        assert outs[1].response_ids == [] and not outs[1].finished and outs[1].meta == {"input_too_long": True}
        with pytest.raises(SGLangHTTPError, match=r"Input length \(10 tokens\) exceeds the maximum allowed length"):
            asyncio.run(go(srv.url, [continued], (12,)))
