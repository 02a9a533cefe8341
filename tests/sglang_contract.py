"""One script of the requests the rollout bridge sends to an SGLang engine, and the shape of each answer.

Run against the fake (``tests/fake_sglang_server.py``) and against the real SGLang 0.5.23 by
``tests/e2e/test_sglang_contract.py``: the status codes and the answer keys (recursively inside
``meta_info``) must be the same. Every request leaves the served weights as they were: the tensor,
distributed and disk updates send back tensors read from the served checkpoint itself.
"""

from __future__ import annotations

import datetime
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

PROMPT = [3, 5, 7, 11, 13]


class Plain(str):
    """A body that is not JSON: "empty" or "text"."""


def shape(body, *, deep: bool = False):
    """What the contract compares: keys of a JSON object (recursively below ``meta_info``), else a type name."""
    if isinstance(body, Plain):
        return f"<{body}>"
    if isinstance(body, dict):
        return {k: (shape(v, deep=True) if deep or k == "meta_info" else type_name(v)) for k, v in sorted(body.items())}
    if deep and isinstance(body, list):  # the element shapes (log-prob triples: number, number, null)
        seen = {json.dumps(shape(x, deep=True), sort_keys=True) for x in body}
        return [json.loads(x) for x in sorted(seen)]
    return type_name(body)


def type_name(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int | float):
        return "number"
    return type(v).__name__


def _call(url: str, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 120.0):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        parsed = json.loads(text) if text[:1] in ("{", "[") or text == "null" else Plain("text" if text else "empty")
    except json.JSONDecodeError:
        parsed = Plain("text")
    return status, parsed


def served_tensor(model_dir: str | Path):
    """(name, tensor) of the served checkpoint's smallest 1-D tensor (a norm weight): pushing it changes nothing."""
    from safetensors import safe_open

    path = Path(model_dir)
    files = sorted(path.glob("*.safetensors"))
    best = None
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for n in h.keys():
                shp = h.get_slice(n).get_shape()
                if len(shp) == 1 and "norm" in n and (best is None or shp[0] < best[2]):
                    best = (f, n, shp[0])
    with safe_open(str(best[0]), framework="pt") as h:
        return best[1], h.get_tensor(best[1])


class Script:
    """The answers collected so far: ``[(step, status, shape), ...]``."""

    def __init__(self, url: str):
        self.url = url
        self.out: list[tuple[str, int, object]] = []

    def step(self, label: str, method: str, path: str, body=None, raw: bytes | None = None):
        status, parsed = _call(self.url, method, path, body, raw)
        self.record(label, status, parsed)
        return status, parsed

    def record(self, label: str, status: int, parsed) -> None:
        self.out.append((label, status, shape(parsed)))


def run_script(url: str, model_dir: str | Path) -> list[tuple[str, int, object]]:
    """Send the script to ``url``; returns ``[(step, status, shape), ...]``."""
    from megatron_mtp_rl.rollout.sglang.client import serialize_named_tensors

    name, tensor = served_tensor(model_dir)
    sc = Script(url)
    step = sc.step
    gen = {
        "rid": "contract-1",
        "input_ids": PROMPT,
        "sampling_params": {"max_new_tokens": 3, "temperature": 0.0, "ignore_eos": True, "sampling_seed": 1},
        "return_logprob": True,
        "logprob_start_len": 0,
        "stream": False,
    }
    step("health", "GET", "/health")
    step("model_info", "GET", "/model_info")
    status, info = _call(url, "GET", "/server_info")
    sc.out.append(("server_info device", status, info.get("device") if isinstance(info, dict) else None))
    step("generate", "POST", "/generate", gen)
    step("flush_cache", "POST", "/flush_cache?timeout=10")
    step("abort unknown rid", "POST", "/abort_request", {"rid": "no-such-request"})
    abort_running(sc, "abort by rid", lambda rid: _call(url, "POST", "/abort_request", {"rid": rid}), 60)
    abort_running(sc, "pause abort", lambda rid: _call(url, "POST", "/pause_generation", {"mode": "abort"}), 70)
    step("continue", "POST", "/continue_generation", {})
    payload = {"serialized_named_tensors": [serialize_named_tensors([(name, tensor)])], "flush_cache": False}
    step("tensor outside session", "POST", "/update_weights_from_tensor", payload)
    step("end without begin", "POST", "/end_weight_update", {})
    step("begin", "POST", "/begin_weight_update", {"selector": "all"})
    step("begin twice", "POST", "/begin_weight_update", {"selector": "all"})
    payload = {"serialized_named_tensors": [serialize_named_tensors([(name, tensor)])], "flush_cache": False}
    step("tensor", "POST", "/update_weights_from_tensor", dict(payload, weight_version="contract-t"))
    _distributed(sc, name, tensor)
    step("end", "POST", "/end_weight_update", {})
    step("disk", "POST", "/update_weights_from_disk",
         {"model_path": str(model_dir), "flush_cache": True, "abort_all_requests": False,
          "weight_version": "contract-d"})  # fmt: skip
    step("disk missing dir", "POST", "/update_weights_from_disk", {"model_path": str(Path(model_dir) / "missing")})
    # not the bridge's (every push names its version) but the real-engine fixture's (tests/real_sglang.py)
    step("update_weight_version", "POST", "/update_weight_version",
         {"new_version": "contract-v", "abort_all_requests": False})  # fmt: skip
    status, body = step("model_info after", "GET", "/model_info")
    sc.out.append(("model_info weight_version", status, body.get("weight_version") if isinstance(body, dict) else None))
    status, body = step("generate after", "POST", "/generate", dict(gen, rid="contract-2"))
    served = body.get("meta_info", {}).get("weight_version") if isinstance(body, dict) else None
    sc.out.append(("meta_info weight_version", status, served))
    step("generate unknown sampling param", "POST", "/generate",
         dict(gen, rid="contract-3", sampling_params={"max_new_tokens": 1, "bogus": 1}))  # fmt: skip
    step("generate unknown field", "POST", "/generate", dict(gen, rid="contract-4", bogus_field=1))
    step("malformed json", "POST", "/generate", raw=b"{not json")
    step("unknown route", "POST", "/no_such_route", {})
    return sc.out


LONG = 100  # new tokens of the request to abort (within the tiny models' 128 positions)


def abort_running(sc: Script, label: str, abort, first: int) -> None:
    """A request aborted while it decodes: the answer (status, shape) and what it holds.

    ``abort(rid)`` stops it (by its rid, or a pause in abort mode). It is sent after a
    delay that grows until the request was running and had decoded tokens, but not all of them, when
    the abort landed (the machine's load decides how long that takes). ``first``: the prompts' first
    token, one no other step's prompt starts with."""
    body = {"rid": "", "input_ids": PROMPT, "return_logprob": True, "stream": False,
            "sampling_params": {"max_new_tokens": LONG, "temperature": 0.0, "ignore_eos": True}}  # fmt: skip
    for k, delay in enumerate((0.05, 0.1, 0.2, 0.4, 0.8)):
        # a first token no earlier prompt had: no prefix-cache hit (SGLang would add cached_tokens_details)
        body = dict(body, rid=f"{label}-{k}".replace(" ", "-"), input_ids=[first + k, *PROMPT])
        res: dict = {}
        t = threading.Thread(target=lambda res=res, body=body: res.update(r=_call(sc.url, "POST", "/generate", body)))
        t.start()
        t.join(delay)
        abort(body["rid"])
        t.join(120)
        _call(sc.url, "POST", "/continue_generation", {})
        status, ans = res["r"]
        meta = ans.get("meta_info", {}) if isinstance(ans, dict) else {}
        n = len(ans.get("output_ids") or []) if isinstance(ans, dict) else -1
        if status == 200 and (meta.get("finish_reason") or {}).get("type") == "abort" and 0 < n < LONG:
            break
    sc.record(label, status, ans)
    lps = meta.get("output_token_logprobs") or []
    held = {
        "finish_reason": meta.get("finish_reason"),
        "tokens decoded before the abort": 0 < n < LONG,
        "completion_tokens = len(output_ids) = len(output_token_logprobs)": meta.get("completion_tokens")
        == n
        == len(lps),
        "output_ids = the log-probs' ids": [e[1] for e in lps] == ans.get("output_ids"),
    }
    sc.out.append((f"{label}: what the answer holds", status, held))


def _distributed(sc: Script, name: str, tensor) -> None:
    """Join a gloo update group with the engine (we are rank 0), send the tensor back through it, drop the group."""
    import torch.distributed as dist

    from megatron_mtp_rl.cluster.weight_sync import join_update_group
    from megatron_mtp_rl.platform.distributed import bound_tcp_store

    group = "contract_group"
    store = bound_tcp_store("127.0.0.1", 0, 2, datetime.timedelta(seconds=60))
    joined: dict = {}

    def join():
        joined["pg"] = join_update_group("127.0.0.1", store.port, 2, group, "gloo", store=store)

    t = threading.Thread(target=join, daemon=True)
    t.start()
    sc.step("init group", "POST", "/init_weights_update_group",
            {"master_address": "127.0.0.1", "master_port": store.port, "rank_offset": 1, "world_size": 2,
             "group_name": group, "backend": "gloo"})  # fmt: skip
    t.join(60)
    pg = joined["pg"]
    body = {"names": [name], "dtypes": [str(tensor.dtype).removeprefix("torch.")], "shapes": [list(tensor.shape)],
            "group_name": group, "flush_cache": False, "weight_version": "contract-g"}  # fmt: skip
    res: dict = {}
    t = threading.Thread(target=lambda: res.update(r=_call(sc.url, "POST", "/update_weights_from_distributed", body)))
    t.start()
    dist.broadcast(tensor.contiguous(), src=0, group=pg)
    t.join(60)
    sc.record("distributed", *res["r"])
    dist.destroy_process_group(pg)
    sc.step("destroy group", "POST", "/destroy_weights_update_group", {"group_name": group})
    sc.step("destroy unknown group", "POST", "/destroy_weights_update_group", {"group_name": group})
