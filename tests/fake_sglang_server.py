"""A loopback stand-in for an SGLang engine (``python -m sglang.launch_server``) and a tiny router.

It speaks the subset of SGLang 0.5.23's HTTP API the rollout bridge uses and is strict about it:
every request body is checked against the field names extracted from the wheel
(``tests/fixtures/sglang_io_struct_fields.json``) and unknown fields get HTTP 400, as do unknown
command-line flags (against the wheel's ``launch_server`` / router flags), so schema drift in
our client or supervisor fails a test instead of a GPU job.

Engine mode answers /health (503 while "starting"), /health_generate, /generate (deterministic
tokens and log-probs, meta_info shaped like SGLang's), /abort_request, /flush_cache,
/pause_generation, /continue_generation, /release_memory_occupation and
/resume_memory_occupation (generation is refused while released), /begin_weight_update,
/end_weight_update and the weight-update routes (recorded; tensor and distributed updates need an open session, as in
0.5.23). Router mode (``--router``) answers /health, /workers (GET/POST/DELETE), /flush_cache
and proxies /generate round-robin, health-checking and (by default) evicting dead workers.

Fake-only knobs are spelled ``--fake-*`` (delay, failure injection, speculative accept length,
startup delay); ``GET /_fake/state`` returns what the server saw and ``POST /_fake/config``
changes knobs at run time. Always binds 127.0.0.1 unless told otherwise.

    python tests/fake_sglang_server.py --model-path m --port 30000 [--fake-delay 0.2]
    python tests/fake_sglang_server.py --router --port 30100 --worker-urls http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import itertools
import json
import math
import os
import signal
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sglang_io_struct_fields.json"
SCHEMA = json.loads(FIXTURE.read_text(encoding="utf-8"))

# Required fields (no default in the wheel's msgspec structs) for the bodies we check.
REQUIRED = {
    "UpdateWeightFromDiskReqInput": ("model_path",),
    "UpdateWeightsFromTensorReqInput": ("serialized_named_tensors",),
    "UpdateWeightsFromDistributedReqInput": ("names", "dtypes", "shapes"),
    "InitWeightsUpdateGroupReqInput": ("master_address", "master_port", "rank_offset", "world_size"),
}
NEEDS_SESSION = ("/update_weights_from_tensor", "/update_weights_from_distributed")


class Config:
    """Run-time knobs (also settable through POST /_fake/config)."""

    def __init__(self, **kw):
        self.delay = 0.0  # seconds each /generate takes
        self.delay_first_n = -1  # only the first n /generate requests are delayed (-1: all)
        self.fail_first_n = 0  # the first n /generate requests answer fail_status
        self.fail_status = 503
        self.vocab = 32
        self.spec_accept_length = 0.0  # > 0: report speculative meta_info with this accept length
        self.startup_delay = 0.0  # /health answers 503 for this long after start
        self.device = "cuda"  # /server_info's device (--device); "cpu": GPU-only requests kill it, as SGLang
        self.health_interval = 0.2  # router: worker health-check period
        self.evict_unhealthy = True  # router: drop workers that fail a health check
        # --enable-return-routed-experts: (num_hidden_layers, num_experts_per_tok, experts) of the model
        # (its config.json), None: the server answers no routes (SGLang without the flag)
        self.routes_shape: tuple[int, int, int] | None = None
        # the model's max_position_embeddings (its config.json; None: no limit). As SGLang 0.5.23 (KV capacity
        # aside): an input of context − 6 tokens or more is refused (HTTP 400), and an output is capped so the
        # request holds at most context − 2 tokens
        self.context_length: int | None = None
        for k, v in kw.items():
            if not hasattr(self, k):
                raise ValueError(f"unknown fake knob {k}")
            setattr(self, k, v)


class State:
    def __init__(self, config: Config, argv: list[str], router: bool, worker_urls: list[str]):
        self.config = config
        self.argv = argv
        self.router = router
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.log: list[dict] = []  # every request: t, method, route, body
        self.generate_count = 0
        self.inflight = 0
        self.max_inflight = 0
        self.events: dict[str, threading.Event] = {}
        self.aborted: list[str] = []
        self.paused = threading.Event()
        self.session_open = False
        self.released: set[str] = set()  # memory tags released (colocated hand-off)
        self.weight_version = "default"
        self.update_groups: dict = {}  # group name -> torch ProcessGroup (gloo, tests)
        self.received: list = []  # (name, sum) of every tensor received by broadcast
        self.first_healthy_at: float | None = None
        self.workers: dict[str, dict] = {}  # router: id -> {"url", "is_healthy"}
        self.rr = itertools.count()
        self.workers_healthy_at_start: dict[str, bool] = {}
        self.ignored_fields: list[str] = []  # unknown top-level /generate fields SGLang would drop
        self.standalone = False  # run as a process (main()): a request that kills SGLang exits it
        self.model_path = ""
        self.model_type, self.architectures = None, None
        for url in worker_urls:
            self.add_worker(url)

    def add_worker(self, url: str) -> str:
        wid = str(uuid.uuid4())
        self.workers[wid] = {"id": wid, "url": url.rstrip("/"), "is_healthy": True}
        return wid

    def record(self, method: str, route: str, body) -> None:
        with self.lock:
            self.log.append({"t": time.monotonic(), "method": method, "route": route, "body": body})

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "argv": self.argv,
                "env": {k: v for k, v in os.environ.items() if k.startswith("SGLANG_")},
                "router": self.router,
                "log": self.log,
                "generate_count": self.generate_count,
                "max_inflight": self.max_inflight,
                "aborted": self.aborted,
                "paused": self.paused.is_set(),
                "session_open": self.session_open,
                "released": sorted(self.released),
                "weight_version": self.weight_version,
                "received": list(self.received),
                "ignored_fields": list(self.ignored_fields),
                "update_groups": sorted(self.update_groups),
                "first_healthy_at": self.first_healthy_at,
                "workers": list(self.workers.values()),
                "workers_healthy_at_start": self.workers_healthy_at_start,
            }


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def fake_tokens(input_ids: list[int], sp: dict, vocab: int) -> tuple[list[int], list[float], dict]:
    """Deterministic generation: a function of the prompt, the seed and the sampling params."""
    base = (sum(input_ids) + int(sp.get("sampling_seed") or 0)) % vocab
    stops = set() if sp.get("ignore_eos") else set(sp.get("stop_token_ids") or [])
    toks: list[int] = []
    reason: dict = {"type": "length", "length": int(sp.get("max_new_tokens", 128))}
    for i in range(int(sp.get("max_new_tokens", 128))):
        t = (base + 3 * i + 1) % vocab
        toks.append(t)
        if t in stops:
            reason = {"type": "stop", "matched": t}
            break
    return toks, [-0.01 * (t + 1) for t in toks], reason


def fake_route(token: int, pos: int, layer: int, topk: int, experts: int) -> list[int]:
    """The fake's experts of one (token, position, layer): distinct, a function of the three."""
    first = (3 * token + pos + 5 * layer) % experts
    return [(first + j) % experts for j in range(topk)]


def fake_routed_experts(ids: list[int], start: int, shape: tuple[int, int, int]) -> str:
    """``meta_info.routed_experts`` as SGLang 0.5.23 answers it: base64 of int32
    ``[len(ids) - 1 - start, num_hidden_layers, topk]`` for the input tokens ``ids[start:-1]``."""
    layers, topk, experts = shape
    rows = [[fake_route(ids[p], p, l, topk, experts) for l in range(layers)] for p in range(start, len(ids) - 1)]  # noqa: E741
    flat = [e for row in rows for layer in row for e in layer]
    return base64.b64encode(struct.pack(f"<{len(flat)}i", *flat)).decode("utf-8")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: State  # set on the subclass per server

    def log_message(self, format, *args):  # quiet
        pass

    # -- plumbing ---------------------------------------------------------------------------
    def _send(self, status: int, payload=None, text: str | None = None, raw: bytes | None = None) -> None:
        data = (
            raw
            if raw is not None
            else (text if text is not None else json.dumps(payload if payload is not None else {})).encode()
        )
        try:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain" if text is not None else "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up (timeout): nothing to answer
            pass

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        return json.loads(raw) if raw else None

    def _check(self, body, cls: str, fields: list[str] | None = None) -> str | None:
        """An error message when the body is not a JSON object of the class's known fields."""
        if body is None:
            body = {}
        if not isinstance(body, dict):
            return f"{cls}: body must be a JSON object"
        known = fields if fields is not None else SCHEMA["request_classes"][cls]
        unknown = sorted(set(body) - set(known))
        if unknown:
            return f"{cls}: unknown field(s) {unknown}"
        missing = [f for f in REQUIRED.get(cls, ()) if f not in body]
        if missing:
            return f"{cls}: missing required field(s) {missing}"
        return None

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        st = self.state
        parsed = urllib.parse.urlparse(self.path)
        route, query = parsed.path, urllib.parse.parse_qs(parsed.query)
        try:
            body = self._body()
        except json.JSONDecodeError as e:  # SGLang answers an OpenAI-style error object
            msg = f"JSON decode error: {e}"
            return self._send(400, {"object": "error", "message": msg, "type": "BadRequestError", "param": None,
                                    "code": 400})  # fmt: skip
        if route == "/_fake/state":
            return self._send(200, st.snapshot())
        if route == "/_fake/config":
            try:
                for k, v in (body or {}).items():
                    Config(**{k: v})  # validates the name
                    setattr(st.config, k, v)
            except ValueError as e:
                return self._send(400, {"error": str(e)})
            return self._send(200, {"ok": True})
        st.record(method, route, body)
        handler = self._router_route if st.router else self._engine_route
        handler(method, route, query, body)

    # -- engine -----------------------------------------------------------------------------
    def _engine_route(self, method: str, route: str, query: dict, body) -> None:
        st = self.state
        info = SCHEMA["http_routes"].get(route)
        if info is None:
            return self._send(404, {"detail": "Not Found"})
        if route in ("/model_info", "/server_info"):
            if method != "GET":
                return self._send(405, {"detail": "Method Not Allowed"})
            return self._send(200, self._model_info() if route == "/model_info" else self._server_info())
        if method not in info["methods"]:
            return self._send(405, {"detail": "Method Not Allowed"})
        cls = info["body"]
        if route == "/generate":
            return self._generate(body)
        body = {} if body is None else body
        if cls is not None:
            err = self._check(body, cls)
            if err:
                return self._send(400, {"error": err})
        if route in ("/health", "/health_generate"):
            if time.monotonic() - st.started < st.config.startup_delay:
                return self._send(503, text="")
            with st.lock:
                st.first_healthy_at = st.first_healthy_at or time.time()
            return self._send(200, text="")
        if route == "/abort_request":
            with st.lock:  # as SGLang 0.5.23's scheduler: every request whose rid starts with the one named
                named = body.get("rid", "")
                st.aborted.append("*" if body.get("abort_all") else named)
                for rid, ev in st.events.items():
                    if body.get("abort_all") or (named and rid.startswith(named)):
                        ev.set()
            return self._send(200, text="")
        if route == "/flush_cache":
            deadline = time.monotonic() + float(query.get("timeout", ["0"])[0])
            while st.inflight and time.monotonic() < deadline:
                time.sleep(0.01)
            if st.inflight:
                return self._send(400, text="Flush cache failed: requests are running.\n")
            return self._send(200, text="Cache flushed.\n")
        if route == "/pause_generation":
            st.paused.set()
            if body.get("mode", "abort") == "abort":
                with st.lock:
                    for ev in st.events.values():
                        ev.set()
            return self._send(200, {"message": "Generation paused successfully.", "status": "ok"})
        if route == "/continue_generation":
            st.paused.clear()
            return self._send(200, {"message": "Generation continued successfully.", "status": "ok"})
        if route in ("/release_memory_occupation", "/resume_memory_occupation"):
            if st.config.device == "cpu":  # SGLang 0.5.23 on CPU: "Found no NVIDIA driver" tears the server down
                return self._die(f"{route}: RuntimeError: Found no NVIDIA driver on your system")
            tags = set(body.get("tags") or ("weights", "kv_cache"))
            with st.lock:
                st.released = st.released | tags if route.startswith("/release") else st.released - tags
            return self._send(200, None, raw=b"null")  # the handler returns nothing: JSON null
        if route == "/update_weight_version":
            st.weight_version = str(body["new_version"])
            msg = f"Weight version updated to {st.weight_version}"
            return self._send(200, {"success": True, "message": msg, "new_version": st.weight_version})
        if route == "/begin_weight_update":
            if st.session_open:
                return self._send(400, {"success": False, "message": "a weight-update session is already open"})
            st.session_open = True
            return self._send(200, {"success": True, "message": "Success"})
        if route == "/end_weight_update":
            if not st.session_open:
                return self._send(400, {"success": False, "message": "no weight-update session is open"})
            st.session_open = False
            return self._send(200, {"success": True, "message": "Success"})
        if route in NEEDS_SESSION and not st.session_open:
            msg = f"{route[1:]} must run between begin_weight_update() and end_weight_update()"
            return self._send(400, {"success": False, "message": msg})
        if route == "/init_weights_update_group" and body.get("backend") == "gloo":
            # Join the trainer's group as SGLang's weight updater does (CPU/gloo in tests):
            # tcp rendezvous, PrefixStore(group_name), rank = rank_offset + tp_rank (0 here).
            # SGLang answers a failed join (a name it holds already, a rendezvous timeout) with success=false
            try:
                st.update_groups[body["group_name"]] = _join_group(body, st.update_groups)
            except Exception as e:
                return self._send(400, {"success": False, "message": f"Failed to init custom process group: {e}."})
        if route == "/destroy_weights_update_group":
            pg = st.update_groups.pop(body.get("group_name"), None)
            if pg is None:
                return self._send(400, {"success": False, "message": "The group to be destroyed does not exist."})
            import torch.distributed as dist

            dist.destroy_process_group(pg)
        if route == "/update_weights_from_distributed" and body.get("group_name") in st.update_groups:
            import torch

            pg = st.update_groups[body["group_name"]]
            got = []
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                torch.distributed.broadcast(t, src=0, group=pg)
                got.append((name, float(t.double().sum())))
            with st.lock:
                st.received.extend(got)
        if route.startswith("/update_weights") and body.get("weight_version"):
            st.weight_version = body["weight_version"]
        content = {"success": True, "message": "Success"}
        if route == "/update_weights_from_disk":
            content["num_paused_requests"] = 0
            if not Path(body["model_path"]).is_dir():  # SGLang cannot load it: success=false, HTTP 400
                content.update(success=False, message=f"Failed to get weights iterator: {body['model_path']}")
                return self._send(400, content)
        return self._send(200, content)

    def _model_info(self) -> dict:
        """``/model_info`` as SGLang 0.5.23 answers it (values of a generation model without a tokenizer)."""
        st = self.state
        return {
            "model_path": st.model_path, "served_model_name": st.model_path, "tokenizer_path": st.model_path,
            "is_generation": True, "preferred_sampling_params": None, "weight_version": st.weight_version,
            "load_format": "auto", "reasoning_parser": None, "tool_call_parser": None, "disaggregation_mode": "null",
            "has_image_understanding": False, "has_audio_understanding": False,
            "model_type": st.model_type, "architectures": st.architectures, "embedding": {},
        }  # fmt: skip

    def _server_info(self) -> dict:
        """A few of ``/server_info``'s resolved server arguments (the real one lists them all)."""
        st = self.state
        return {"device": st.config.device, "model_path": st.model_path, "tp_size": 1, "version": "0.5.23",
                "launch_command": " ".join(st.argv)}  # fmt: skip

    def _die(self, why: str) -> None:
        """What SGLang does when a request handler raises: the whole server goes down (the process exits)."""
        print(f"fake_sglang_server: {why}; the server exits", file=sys.stderr, flush=True)
        if self.state.standalone:
            os._exit(1)
        threading.Thread(target=self.server.shutdown, daemon=True).start()  # in-process: stop serving
        self.close_connection = True

    def _generate(self, body) -> None:
        st, cfg = self.state, self.state.config
        err = None if isinstance(body, dict) else "GenerateReqInput: body must be a JSON object"
        if not err:  # SGLang 0.5.23 drops unknown top-level fields (HTTP 200): noted, so drift still shows
            with st.lock:
                st.ignored_fields += sorted(set(body) - set(SCHEMA["request_classes"]["GenerateReqInput"]))
            sp = body.get("sampling_params") or {}
            err = self._check(sp, "SamplingParams", SCHEMA["api_contract"]["SamplingParams"])
        if not err and not (
            isinstance(body.get("input_ids"), list) and all(isinstance(t, int) for t in body["input_ids"])
        ):
            err = "this fake takes one prompt as a flat input_ids list"
        if not err and not isinstance(body.get("rid"), str):
            err = "this fake needs a string rid"
        if err:
            return self._send(400, {"error": err})
        if cfg.context_length:  # srt/managers: validate_input_length, init_req_max_new_tokens
            n_in, max_req_len = len(body["input_ids"]), cfg.context_length - 1
            if n_in >= max_req_len - 5:
                msg = (f"Input length ({n_in} tokens) exceeds the maximum allowed length ({max_req_len - 5} tokens). "
                       "Use a shorter input or enable --allow-auto-truncate.")  # fmt: skip
                return self._send(400, {"error": {"message": msg}})
            sp = dict(sp, max_new_tokens=max(0, min(int(sp.get("max_new_tokens", 128)), max_req_len - n_in - 1)))
        rid, t0 = body["rid"], time.monotonic()
        if st.released:  # colocated hand-off: no generation while the memory is the trainer's
            return self._send(
                400, {"error": f"memory released ({sorted(st.released)}): resume_memory_occupation first"}
            )
        while st.paused.is_set():  # a paused SGLang holds new requests until continue
            time.sleep(0.01)
        with st.lock:
            n = st.generate_count
            st.generate_count += 1
            ev = st.events[rid] = threading.Event()
            st.inflight += 1
            st.max_inflight = max(st.max_inflight, st.inflight)
        try:
            if n < cfg.fail_first_n:
                return self._send(cfg.fail_status, {"error": f"injected failure {n + 1}/{cfg.fail_first_n}"})
            delay = cfg.delay if (cfg.delay_first_n < 0 or n < cfg.delay_first_n) else 0.0
            aborted = ev.wait(delay) if delay > 0 else ev.is_set()
            toks, lps, reason = fake_tokens(body["input_ids"], sp, cfg.vocab)
            start = int(body.get("routed_experts_start_len") or 0)
            if aborted:  # as SGLang 0.5.23: HTTP 200 with the tokens decoded so far (spread over the delay)
                k = min(len(toks), int(len(toks) * (time.monotonic() - t0) / delay)) if delay > 0 else 0
                toks, lps = toks[:k], lps[:k]
                reason = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
            if body.get("return_routed_experts") and not 0 <= start <= len(body["input_ids"]):
                toks, lps, reason = [], [], {"type": "abort", "message": "Abort request"}  # as the scheduler does
            ids = body["input_ids"]
            lp_start = body.get("logprob_start_len")
            lp_start = -1 if lp_start is None else int(lp_start)
            prompt_lps = []  # with logprob_start_len ≥ 0 the prompt's own log-probs (none for token 0)
            if body.get("return_logprob") and lp_start >= 0:
                prompt_lps = [
                    [None if i == 0 else -0.01 * (t + 1), t, None] for i, t in enumerate(ids) if i >= lp_start
                ]
            meta = {
                "id": rid,
                "finish_reason": reason,
                "prompt_tokens": len(ids),
                "weight_version": st.weight_version,
                "weight_versions": [{"version": st.weight_version, "start": 0, "end": len(toks)}],
                "num_retractions": 0,
                "reasoning_tokens": 0,
                "completion_tokens": len(toks),
                "cached_tokens": 0,
                "cached_tokens_details": None,
                "dp_rank": None,
                "input_token_logprobs": prompt_lps,
                "output_token_logprobs": [[lp, t, None] for lp, t in zip(lps, toks)],
                "output_token_logprobs_length": len(toks),
                "e2e_latency": time.monotonic() - t0,
                "response_sent_to_client_ts": time.time(),
            }
            if body.get("return_routed_experts") and cfg.routes_shape and toks:
                meta["routed_experts"] = fake_routed_experts(body["input_ids"] + toks, start, cfg.routes_shape)
            if cfg.spec_accept_length > 0 and toks:
                vct = max(1, math.ceil(len(toks) / cfg.spec_accept_length))
                meta.update(
                    spec_verify_ct=vct,
                    spec_accept_length=len(toks) / vct,
                    spec_accept_rate=(len(toks) - vct) / max(1, vct * 3),
                    spec_num_correct_drafts=len(toks) - vct,
                    spec_num_proposed_drafts=vct * 3,
                )
            answer = {"output_ids": toks, "meta_info": meta}
            if "--skip-tokenizer-init" not in st.argv:  # SGLang detokenizes only when it has a tokenizer
                answer = {"text": "", **answer}
            return self._send(200, answer)
        finally:
            with st.lock:
                st.inflight -= 1
                st.events.pop(rid, None)

    # -- router -----------------------------------------------------------------------------
    def _router_route(self, method: str, route: str, query: dict, body) -> None:
        st = self.state
        if route in ("/health", "/health_generate", "/liveness", "/readiness"):
            return self._send(200, text="")
        if route == "/workers" and method == "GET":
            with st.lock:
                ws = list(st.workers.values())
            return self._send(200, {"workers": ws, "total": len(ws)})
        if route == "/workers" and method == "POST":
            if not isinstance(body, dict) or not isinstance(body.get("url"), str):
                return self._send(400, {"error": "WorkerConfigRequest needs a url"})
            with st.lock:
                wid = st.add_worker(body["url"])
            return self._send(202, {"status": "accepted", "worker_id": wid})
        if route.startswith("/workers/") and method == "DELETE":
            with st.lock:
                gone = st.workers.pop(route.split("/", 2)[2], None)
            return self._send(202 if gone else 404, {"status": "accepted" if gone else "not found"})
        if route == "/flush_cache" and method == "POST":
            codes = [_post(w["url"] + "/flush_cache", None)[0] for w in list(st.workers.values())]
            return self._send(200 if all(c == 200 for c in codes) else 500, {"codes": codes})
        if route == "/generate" and method == "POST":
            with st.lock:
                healthy = [w for w in st.workers.values() if w["is_healthy"]]
                start = next(st.rr)
            for k in range(len(healthy)):
                w = healthy[(start + k) % len(healthy)]
                status, payload = _post(w["url"] + "/generate", body, timeout=600)
                if status:
                    return self._send(status, payload)
                w["is_healthy"] = False
            return self._send(503, {"error": "No available workers"})
        return self._send(404, {"detail": "Not Found"})


def _post(url: str, body, timeout: float = 10.0):
    data = json.dumps(body).encode() if body is not None else b""
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, (json.loads(raw) if raw and raw[:1] in b"{[" else {})
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, (json.loads(raw) if raw and raw[:1] in b"{[" else {})
    except OSError:
        return 0, None


def _router_health_loop(st: State, stop: threading.Event) -> None:
    """Mark (and by default evict) workers that fail /health, like the real router's checker."""
    while not stop.wait(st.config.health_interval):
        for wid, w in list(st.workers.items()):
            ok = _get(w["url"] + "/health", timeout=1.0) == 200
            with st.lock:
                if ok:
                    w["is_healthy"] = True
                elif st.config.evict_unhealthy:
                    st.workers.pop(wid, None)
                else:
                    w["is_healthy"] = False


def _join_group(body: dict, held: dict):
    """The engine's end of the trainer's update group (refused, as torch refuses, for a name it holds)."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

    if body["group_name"] in held:
        raise ValueError("The specified group name has already been created, please use a different group name")
    timeout = datetime.timedelta(seconds=60)
    url = f"tcp://{body['master_address']}:{body['master_port']}"
    store, rank, world = next(rendezvous(url, int(body["rank_offset"]), int(body["world_size"]), timeout=timeout))
    store.set_timeout(timeout)
    pg, _ = _new_process_group_helper(
        world, rank, [], "gloo", PrefixStore(body["group_name"], store), group_name=body["group_name"], timeout=timeout
    )
    _world.pg_group_ranks[pg] = {i: i for i in range(world)}
    del dist
    return pg


class FakeServer:
    """One fake engine or router; use ``start()`` in-process or run this file as a process."""

    def __init__(
        self,
        port: int = 0,
        host: str = "127.0.0.1",
        *,
        router: bool = False,
        worker_urls: list[str] | None = None,
        argv: list[str] | None = None,
        **knobs,
    ):
        self.state = State(Config(**knobs), argv or [], router, worker_urls or [])
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> FakeServer:
        if self.state.router:
            st = self.state
            st.workers_healthy_at_start = {w["url"]: _get(w["url"] + "/health") == 200 for w in st.workers.values()}
            self._threads.append(threading.Thread(target=_router_health_loop, args=(st, self._stop), daemon=True))
        self._threads.append(threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}))
        for t in self._threads:
            t.daemon = True
            t.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        # the update groups it joined in this process (an in-process fake): destroyed, as a stopped engine's are
        import torch.distributed as dist

        for pg in list(self.state.update_groups.values()):
            if isinstance(pg, dist.ProcessGroup):
                with contextlib.suppress(ValueError, RuntimeError):
                    dist.destroy_process_group(pg)
        self.state.update_groups.clear()

    def __enter__(self) -> FakeServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description="fake SGLang engine / router", allow_abbrev=False)
    p.add_argument("--router", action="store_true", help="run as a fake sglang-router")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=30000)
    p.add_argument("--model-path", "--model")
    p.add_argument("--worker-urls", nargs="*", default=[])
    p.add_argument("--fake-delay", type=float, default=0.0)
    p.add_argument("--fake-delay-first-n", type=int, default=-1)
    p.add_argument("--fake-fail-first-n", type=int, default=0)
    p.add_argument("--fake-fail-status", type=int, default=503)
    p.add_argument("--fake-spec-accept-length", type=float, default=0.0)
    p.add_argument("--fake-startup-delay", type=float, default=0.0)
    p.add_argument("--fake-health-interval", type=float, default=0.2)
    p.add_argument("--fake-keep-unhealthy", action="store_true", help="router: mark dead workers, do not evict")
    a, rest = p.parse_known_args(argv)
    allowed = set(SCHEMA["router_flags"] if a.router else SCHEMA["launch_server_flags"])
    unknown = [t.split("=", 1)[0] for t in rest if t.startswith("--") and t.split("=", 1)[0] not in allowed]
    if unknown:
        print(f"fake_sglang_server: unrecognized arguments (not in the wheel's CLI): {unknown}", file=sys.stderr)
        return 2
    if not a.router and not a.model_path:
        print("fake_sglang_server: --model-path is required", file=sys.stderr)
        return 2
    vocab, hf, context = 32, {}, None
    cfg_path = Path(a.model_path or "", "config.json")
    routes_shape = None
    if a.model_path and cfg_path.exists():  # generate ids the model's tokenizer knows
        hf = json.loads(cfg_path.read_text())
        vocab = int(hf.get("vocab_size", vocab))
        context = hf.get("max_position_embeddings")
        experts = hf.get("n_routed_experts") or hf.get("num_experts")
        if "--enable-return-routed-experts" in argv and experts:
            routes_shape = (int(hf["num_hidden_layers"]), int(hf["num_experts_per_tok"]), int(experts))
    device = next((rest[i + 1] for i, t in enumerate(rest[:-1]) if t == "--device"), None)
    device = next((t.split("=", 1)[1] for t in rest if t.startswith("--device=")), device)
    server = FakeServer(
        a.port,
        a.host,
        router=a.router,
        worker_urls=a.worker_urls,
        argv=argv,
        delay=a.fake_delay,
        delay_first_n=a.fake_delay_first_n,
        fail_first_n=a.fake_fail_first_n,
        fail_status=a.fake_fail_status,
        spec_accept_length=a.fake_spec_accept_length,
        startup_delay=a.fake_startup_delay,
        health_interval=a.fake_health_interval,
        evict_unhealthy=not a.fake_keep_unhealthy,
        vocab=vocab,
        device=device or "cuda",
        routes_shape=routes_shape,
        context_length=int(context) if context else None,
    )
    st = server.state
    st.standalone, st.model_path = True, a.model_path or ""
    st.model_type, st.architectures = hf.get("model_type"), hf.get("architectures")
    server.start()
    print(f"fake {'router' if a.router else 'engine'} listening on {server.url}", flush=True)
    dump_dir = os.environ.get("FAKE_SGLANG_STATE_DIR")  # tests: what it was asked, written when it stops
    if dump_dir:
        dump = Path(dump_dir) / f"{'router' if a.router else 'engine'}-{a.port}.json"

        def on_sigterm(*_):
            _dump_state(server, dump)  # first: the supervisor SIGKILLs a server slow to stop
            sys.exit(0)

        def keep_dumping() -> None:  # and while it runs: a SIGKILL on a loaded machine loses nothing told
            seen = -1
            while True:
                time.sleep(0.5)
                n = len(server.state.snapshot()["log"])
                if n != seen:
                    _dump_state(server, dump)
                    seen = n

        signal.signal(signal.SIGTERM, on_sigterm)
        threading.Thread(target=keep_dumping, daemon=True).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def _dump_state(server: FakeServer, path: Path) -> None:
    """The request log without bodies (route, time, weight version asked or given, update group name and
    rendezvous address) and the router's workers."""
    snap = server.state.snapshot()
    log = [
        {"t": r["t"], "route": r["route"], "method": r["method"],
         "weight_version": (r["body"] or {}).get("weight_version") if isinstance(r["body"], dict) else None,
         "url": (r["body"] or {}).get("url") if isinstance(r["body"], dict) else None,
         **{k: r["body"][k] for k in ("group_name", "master_address") if k in (r["body"] or {})}}
        for r in snap["log"]
    ]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{threading.get_ident()}")
    tmp.write_text(
        json.dumps(
            {
                "url": server.url,
                "log": log,
                "workers": snap["workers"],
                "generate_count": snap["generate_count"],
                "weight_version": snap["weight_version"],
            }
        )
    )
    os.replace(tmp, path)  # whole or not at all: a reader never sees half a file


if __name__ == "__main__":
    sys.exit(main())
