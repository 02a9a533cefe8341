"""The slice of SGLang's native HTTP API the rollout bridge speaks, in one place.

Checked against sglang 0.5.23 and sglang-router 0.3.2 (``tools/check_sglang_schema.py``
re-extracts the request classes from a wheel into ``tests/fixtures/sglang_io_struct_fields.json``;
the unit tests and the fake server hold every payload built here to that file). What the wheel
showed, and this module relies on:

* ``POST /generate`` takes a ``GenerateReqInput``; ``sampling_params`` is checked against the
  ``sglang.api.v1.SamplingParams`` contract, which *rejects* unknown keys (HTTP 400). A
  single-prompt answer is ``{"text"?, "output_ids", "meta_info"}``; ``meta_info`` carries
  ``id`` (our ``rid``), ``finish_reason`` (``{"type": "stop", "matched": ...}``,
  ``{"type": "length", "length": n}`` or ``{"type": "abort", "message": ...}``),
  ``prompt_tokens``, ``completion_tokens``, ``cached_tokens``, ``weight_version`` and, with
  ``return_logprob``, ``output_token_logprobs`` = ``[[logprob, token_id, text|None], ...]``.
  With speculative decoding it adds ``spec_verify_ct`` (verify rounds) and
  ``spec_accept_length`` (= completion_tokens / spec_verify_ct, the bonus token included).
* The returned log-probs are of the temperature-scaled distribution (before top-p), like the
  local engine's; temperature 0 is greedy and then the log-probs are at temperature 1.
* A matched stop token is part of ``output_ids`` (``finished_len = matched_pos + 1`` in
  ``schedule_batch.py``), as in the local engine.
* Of the routes we use, the router (sglang-router 0.3.2) serves ``/generate``, ``/health`` and
  ``/flush_cache``; abort, pause/continue and the weight-update routes are not in its binary, so
  they must go to every engine directly.
* MoE routes (R3): a server started with ``--enable-return-routed-experts`` answers a request
  with ``return_routed_experts`` with ``meta_info.routed_experts``, the base64 of int32
  ``[seqlen − 1 − routed_experts_start_len, num_hidden_layers, num_experts_per_tok]``
  (C order; ``state_capturer/routed_experts.py``, ``base.py:get_topk``): the rows of the input
  tokens from ``routed_experts_start_len`` on (the last sampled token is never fed), every decoder
  layer (a dense layer's columns are meaningless). ``routed_experts_start_len`` must be ≤ the
  prompt's length (else the request is aborted); multi-turn appends ask only for the new rows.
* ``/update_weights_from_tensor`` and ``/update_weights_from_distributed`` are refused unless a
  session is open: ``/begin_weight_update`` before, ``/end_weight_update`` after.
"""

from __future__ import annotations

from collections.abc import Collection

from megatron_mtp_rl.models.sampling_params import SamplingParams
from megatron_mtp_rl.rollout.engine import Completion

SGLANG_VERSION = "0.5.23"
SGLANG_ROUTER_VERSION = "0.3.2"

# Engine routes (sglang/srt/entrypoints/http_server.py).
GENERATE = "/generate"
HEALTH = "/health"
HEALTH_GENERATE = "/health_generate"
FLUSH_CACHE = "/flush_cache"  # GET/POST, query parameter `timeout` (seconds to wait for idle)
PAUSE_GENERATION = "/pause_generation"
CONTINUE_GENERATION = "/continue_generation"
ABORT_REQUEST = "/abort_request"
UPDATE_WEIGHTS_FROM_DISK = "/update_weights_from_disk"
UPDATE_WEIGHTS_FROM_TENSOR = "/update_weights_from_tensor"
UPDATE_WEIGHTS_FROM_DISTRIBUTED = "/update_weights_from_distributed"
INIT_WEIGHTS_UPDATE_GROUP = "/init_weights_update_group"
DESTROY_WEIGHTS_UPDATE_GROUP = "/destroy_weights_update_group"
BEGIN_WEIGHT_UPDATE = "/begin_weight_update"
END_WEIGHT_UPDATE = "/end_weight_update"
MODEL_INFO = "/model_info"  # GET: model_path, weight_version, architectures, ...
SERVER_INFO = "/server_info"  # GET: the resolved server arguments (``device`` among them), version, ...
# Colocated hand-off: free (and take back) the engine's GPU memory; tags "weights" / "kv_cache" (None: both).
RELEASE_MEMORY_OCCUPATION = "/release_memory_occupation"
RESUME_MEMORY_OCCUPATION = "/resume_memory_occupation"

# Router control plane (sglang-router 0.3.2): POST {"url": ...} registers a worker (202),
# GET lists {"workers": [{"id", "url", "is_healthy", ...}]}, DELETE /workers/{id} removes one.
ROUTER_WORKERS = "/workers"

# The body class each engine route parses, by its name in sglang/srt/managers/io_struct.py.
ROUTE_REQUEST_CLASS: dict[str, str] = {
    GENERATE: "GenerateReqInput",
    ABORT_REQUEST: "AbortReq",
    PAUSE_GENERATION: "PauseGenerationReqInput",
    CONTINUE_GENERATION: "ContinueGenerationReqInput",
    UPDATE_WEIGHTS_FROM_DISK: "UpdateWeightFromDiskReqInput",
    UPDATE_WEIGHTS_FROM_TENSOR: "UpdateWeightsFromTensorReqInput",
    UPDATE_WEIGHTS_FROM_DISTRIBUTED: "UpdateWeightsFromDistributedReqInput",
    INIT_WEIGHTS_UPDATE_GROUP: "InitWeightsUpdateGroupReqInput",
    DESTROY_WEIGHTS_UPDATE_GROUP: "DestroyWeightsUpdateGroupReqInput",
    BEGIN_WEIGHT_UPDATE: "BeginWeightUpdateReqInput",
    END_WEIGHT_UPDATE: "EndWeightUpdateReqInput",
    RELEASE_MEMORY_OCCUPATION: "ReleaseMemoryOccupationReqInput",
    RESUME_MEMORY_OCCUPATION: "ResumeMemoryOccupationReqInput",
}

# The fields we ever send, per request class (a subset of the wheel's; the tests check it).
FIELDS_USED: dict[str, tuple[str, ...]] = {
    "GenerateReqInput": (
        "rid",
        "input_ids",
        "sampling_params",
        "return_logprob",
        "logprob_start_len",
        "stream",
        "return_routed_experts",
        "routed_experts_start_len",
    ),
    "SamplingParams": ("max_new_tokens", "temperature", "top_p", "stop_token_ids", "ignore_eos", "sampling_seed"),
    "AbortReq": ("rid", "abort_all"),
    "PauseGenerationReqInput": ("mode",),
    "ContinueGenerationReqInput": ("torch_empty_cache",),
    "UpdateWeightFromDiskReqInput": (
        "model_path",
        "load_format",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
    ),
    "UpdateWeightsFromTensorReqInput": (
        "serialized_named_tensors",
        "load_format",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
        "selector",
    ),
    "UpdateWeightsFromDistributedReqInput": (
        "names",
        "dtypes",
        "shapes",
        "group_name",
        "flush_cache",
        "abort_all_requests",
        "weight_version",
        "load_format",
        "selector",
    ),
    "InitWeightsUpdateGroupReqInput": (
        "master_address",
        "master_port",
        "rank_offset",
        "world_size",
        "group_name",
        "backend",
    ),
    "DestroyWeightsUpdateGroupReqInput": ("group_name",),
    "BeginWeightUpdateReqInput": ("selector",),
    "EndWeightUpdateReqInput": (),
    "ReleaseMemoryOccupationReqInput": ("tags",),
    "ResumeMemoryOccupationReqInput": ("tags",),
}

# Keys of meta_info copied into Completion.meta when present.
_META_KEYS = (
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "weight_version",
    "num_retractions",
    "spec_accept_length",
    "spec_accept_rate",
    "spec_verify_ct",
    "spec_num_correct_drafts",
    "spec_num_proposed_drafts",
)


class SGLangResponseError(RuntimeError):
    """A /generate answer we cannot turn into a Completion (schema drift or a server bug)."""


class SGLangAbortedError(RuntimeError):
    """The server aborted the request (pause in abort mode, /abort_request, OOM): retryable."""


def build_generate_payload(
    input_ids: list[int],
    params: SamplingParams,
    *,
    rid: str,
    sampling_seed: int | None = None,
    routed_experts_start_len: int | None = None,
) -> dict:
    """One non-streaming /generate request for token ids, asking for the output log-probs.

    ``eos_id=None`` means "never stop early" in our SamplingParams, so it maps to
    ``ignore_eos``; otherwise EOS goes in ``stop_token_ids`` (SGLang also stops at the model's
    own EOS ids). ``sampling_seed`` only takes effect on servers started with
    ``--enable-deterministic-inference``; elsewhere SGLang ignores it. ``routed_experts_start_len``
    (not None): ask for the MoE routes of the input tokens from that position on (R3).
    """
    sp: dict = {
        "max_new_tokens": int(params.max_new_tokens),
        "temperature": float(params.temperature),
        "top_p": float(params.top_p),
    }
    if params.eos_id is None:
        sp["ignore_eos"] = True
    else:
        sp["stop_token_ids"] = [int(t) for t in params.stops]
    if sampling_seed is not None:
        sp["sampling_seed"] = int(sampling_seed) % (2**63)
    out = {
        "rid": rid,
        "input_ids": [int(t) for t in input_ids],
        "sampling_params": sp,
        "return_logprob": True,
        "logprob_start_len": -1,  # log-probs of the output tokens only
        "stream": False,
    }
    if routed_experts_start_len is not None:
        out.update(return_routed_experts=True, routed_experts_start_len=int(routed_experts_start_len))
    return out


def decode_routed_experts(b64: str, num_layers: int, topk: int):
    """``meta_info.routed_experts`` → an int32 tensor ``[rows, num_layers, topk]``."""
    import base64

    import torch

    raw = base64.b64decode(b64)
    flat = torch.frombuffer(bytearray(raw), dtype=torch.int32)
    if flat.numel() % (num_layers * topk):
        raise SGLangResponseError(
            f"routed_experts holds {flat.numel()} ids, not a multiple of {num_layers} layers x top-{topk}"
        )
    return flat.reshape(-1, num_layers, topk)


def finish_type(meta_info: dict) -> str | None:
    """'stop', 'length', 'abort' or None (unfinished) from SGLang's finish_reason."""
    fr = meta_info.get("finish_reason")
    if fr is None:
        return None
    if isinstance(fr, dict):
        return fr.get("type")
    return str(fr)


def parse_generate_response(
    resp: dict, *, rid: str | None = None, partial_ok: bool = False, stops: Collection[int] = ()
) -> Completion:
    """A single-prompt /generate answer as a Completion; raises on abort or a malformed answer.

    ``partial_ok`` (partial rollouts): an aborted answer is the tokens generated before the abort,
    unfinished, with ``meta["aborted"]``. SGLang 0.5.23 answers an abort with HTTP 200,
    ``finish_reason`` ``{"type": "abort", ...}`` and the tokens (with log-probs) it had generated: none
    for a request still in its waiting queue. The abort wins over a stop token decoded in the same
    step, so the tokens may end with (or, with speculative decoding, run past) one of ``stops``: the
    sample is then cut after it and finished, as SGLang would have answered without the abort.
    """
    if not isinstance(resp, dict) or not isinstance(resp.get("meta_info"), dict):
        raise SGLangResponseError(f"/generate answer has no meta_info: {str(resp)[:200]}")
    meta = resp["meta_info"]
    if rid is not None and meta.get("id") not in (None, rid):
        raise SGLangResponseError(f"/generate answered request {meta.get('id')!r}, expected {rid!r}")
    kind = finish_type(meta)
    if kind == "abort" and partial_ok:
        ids, logprobs = _tokens(resp, meta, required=False)
        cut = next((i + 1 for i, t in enumerate(ids) if t in stops), None)
        out_meta = _out_meta(meta, rid, "stop" if cut else "abort")
        if cut is not None:
            return Completion(ids[:cut], logprobs[:cut], True, meta=out_meta)
        return Completion(ids, logprobs, False, meta={**out_meta, "aborted": True})
    if kind == "abort":
        fr = meta.get("finish_reason") or {}
        raise SGLangAbortedError(f"request {rid or meta.get('id')} aborted by the server: {fr.get('message', '')}")
    if kind not in ("stop", "length"):
        raise SGLangResponseError(f"/generate answer is not finished (finish_reason={meta.get('finish_reason')!r})")
    ids, logprobs = _tokens(resp, meta, required=True)
    return Completion(response_ids=ids, logprobs=logprobs, finished=kind == "stop", meta=_out_meta(meta, rid, kind))


def _tokens(resp: dict, meta: dict, *, required: bool) -> tuple[list[int], list[float]]:
    """(output ids, their log-probs); the two lists SGLang sends must name the same tokens."""
    entries = meta.get("output_token_logprobs")
    if entries is None:
        if required or resp.get("output_ids"):
            raise SGLangResponseError("/generate answer has no output_token_logprobs (return_logprob not honoured)")
        entries = []
    try:
        lp_ids = [int(e[1]) for e in entries]
        logprobs = [float(e[0]) for e in entries]
    except (TypeError, ValueError, IndexError) as e:
        raise SGLangResponseError(f"malformed output_token_logprobs entry: {e}") from None
    ids = resp.get("output_ids")
    ids = lp_ids if ids is None else [int(t) for t in ids]
    if ids != lp_ids:
        raise SGLangResponseError(
            f"output_ids ({len(ids)} tokens) disagree with output_token_logprobs ({len(lp_ids)} tokens)"
        )
    return ids, logprobs


def _out_meta(meta: dict, rid: str | None, kind: str | None) -> dict:
    out: dict = {"rid": meta.get("id", rid), "finish_reason": kind}
    fr = meta.get("finish_reason")
    if isinstance(fr, dict) and "matched" in fr:
        out["matched"] = fr["matched"]
    for key in _META_KEYS:
        if meta.get(key) is not None:
            out[key] = meta[key]
    if meta.get("routed_experts") is not None:  # decoded by the engine, which knows the model's shape
        out["routed_experts"] = meta["routed_experts"]
    return out


__all__ = [
    "FIELDS_USED",
    "ROUTE_REQUEST_CLASS",
    "SGLANG_ROUTER_VERSION",
    "SGLANG_VERSION",
    "SGLangAbortedError",
    "SGLangResponseError",
    "build_generate_payload",
    "decode_routed_experts",
    "finish_type",
    "parse_generate_response",
]
