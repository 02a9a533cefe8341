"""R3 through the SGLang bridge: routes asked for, decoded from SGLang 0.5.23's answer layout
(base64 int32 [seqlen - 1 - start, num_hidden_layers, topk]), multi-turn appends included."""

import base64
import json
import struct
from pathlib import Path

import pytest
import torch

from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.models.routing_replay import extend_routes
from megatron_mtp_rl.rollout.sglang import schema as S
from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
from tests.fake_sglang_server import FakeServer

SCHEMA = json.loads((Path(__file__).parents[1] / "fixtures" / "sglang_io_struct_fields.json").read_text())
LAYERS, TOPK, EXPERTS = 3, 2, 8  # layer 0 dense (its columns are dropped), layers 1 and 2 MoE


def _expected(ids, start):
    """By hand: the fake's route rule on positions start..len(ids)-2, MoE layers 1 and 2."""
    rows = []
    for p in range(start, len(ids) - 1):
        rows.append([[(3 * ids[p] + p + 5 * layer + j) % EXPERTS for j in range(TOPK)] for layer in (1, 2)])
    return torch.tensor(rows, dtype=torch.uint8).reshape(-1, 2, TOPK)


def test_payload_fields_are_the_wheels_and_decode_reads_int32_rows():
    p = S.build_generate_payload([1, 2, 3], SamplingParams(max_new_tokens=2), rid="r", routed_experts_start_len=2)
    assert set(p) <= set(SCHEMA["request_classes"]["GenerateReqInput"])
    assert (p["return_routed_experts"], p["routed_experts_start_len"]) == (True, 2)
    assert "return_routed_experts" not in S.build_generate_payload([1], SamplingParams(), rid="q")
    assert "--enable-return-routed-experts" in SCHEMA["launch_server_flags"]
    b64 = base64.b64encode(struct.pack("<8i", *range(8))).decode()
    assert S.decode_routed_experts(b64, 2, 2).tolist() == [[[0, 1], [2, 3]], [[4, 5], [6, 7]]]
    with pytest.raises(S.SGLangResponseError, match="not a multiple"):
        S.decode_routed_experts(b64, 3, 2)


def test_engine_decodes_routes_and_appends_turns():
    params = SamplingParams(temperature=1.0, max_new_tokens=4, eos_id=None)
    with FakeServer(routes_shape=(LAYERS, TOPK, EXPERTS), vocab=32) as srv:
        eng = SGLangEngine(srv.url)
        eng.route_shape = (LAYERS, TOPK, [1, 2], EXPERTS)
        try:
            prompts = [[5, 9, 2], [7, 1, 4, 4]]
            outs, _ = eng.generate(prompts, params, seed=1)
            for p, o in zip(prompts, outs):
                assert o.routes.dtype == torch.uint8 and "routed_experts" not in o.meta
                assert torch.equal(o.routes, _expected(p + o.response_ids, 0))
            # turn 2: the first turn's context, a tool's tokens, and only the new rows asked for
            ctx = prompts[0] + outs[0].response_ids + [11, 12]
            start = len(prompts[0]) + len(outs[0].response_ids) - 1
            (o2,), _ = eng.generate([ctx], params, seed=2, routes_start=[start])
            assert o2.routes.shape[0] == len(ctx) + len(o2.response_ids) - 1 - start
            whole = extend_routes(outs[0].routes, o2.routes, start)
            assert torch.equal(whole, _expected(ctx + o2.response_ids, 0))
            (one,), _ = eng.generate([ctx], params, seed=2)  # the same turn asked for in full
            assert torch.equal(one.routes, whole)
        finally:
            eng.close()


def test_a_server_without_the_flag_is_a_clear_error():
    with FakeServer(vocab=32) as srv:
        eng = SGLangEngine(srv.url, max_retries=0)
        eng.route_shape = (LAYERS, TOPK, [1, 2], EXPERTS)
        try:
            with pytest.raises(S.SGLangResponseError, match="--enable-return-routed-experts"):
                eng.generate([[1, 2]], SamplingParams(max_new_tokens=2), seed=0)
        finally:
            eng.close()


def test_partial_rollout_stop_asks_routes_and_an_abort_keeps_what_it_has():
    """--partial-rollout with R3: the stop path asks for routes too; an aborted answer with tokens keeps
    their routes (SGLang routes a running request it aborts), one aborted before it ran has none."""
    from megatron_mtp_rl.models.sampling_params import GroupStop
    from tests.fake_sglang_server import fake_routed_experts

    params = SamplingParams(temperature=1.0, max_new_tokens=4, eos_id=None)
    with FakeServer(routes_shape=(LAYERS, TOPK, EXPERTS), vocab=32, delay=20.0, delay_first_n=1) as srv:
        eng = SGLangEngine(srv.url)
        eng.route_shape = (LAYERS, TOPK, [1, 2], EXPERTS)
        try:
            prompts = [[5, 9, 2], [7, 1, 4, 4]]
            outs, _ = eng.generate(prompts, params, seed=1, stop=GroupStop(groups=(0, 1), count=1))
        finally:
            eng.close()
    slow = next(i for i, o in enumerate(outs) if o.meta.get("aborted"))
    assert outs[slow].response_ids == [] and outs[slow].routes is None
    done = outs[1 - slow]
    assert torch.equal(done.routes, _expected(prompts[1 - slow] + done.response_ids, 0))
    ids = [5, 9, 2, 17, 4]  # an abort after two tokens: their routes come with the answer
    body = {"output_ids": [17, 4], "meta_info": {"id": "r", "finish_reason": {"type": "abort"},
            "output_token_logprobs": [[-0.1, 17, None], [-0.2, 4, None]],
            "routed_experts": fake_routed_experts(ids, 0, (LAYERS, TOPK, EXPERTS))}}  # fmt: skip
    c = S.parse_generate_response(body, rid="r", partial_ok=True)
    assert torch.equal(SGLangEngine._routes(eng, c, len(ids) - 1), _expected(ids, 0))
    # an answer whose tokens and log-probs disagree is refused (SGLang 0.5.23 sends both for an aborted request)
    body["meta_info"]["output_token_logprobs"] = body["meta_info"]["output_token_logprobs"][:1]
    with pytest.raises(S.SGLangResponseError, match="disagree"):
        S.parse_generate_response(body, rid="r", partial_ok=True)
