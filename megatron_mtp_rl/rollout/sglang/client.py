"""Asyncio HTTP client for one SGLang endpoint (an engine or the router).

Rollouts send one /generate per sample, so a slow or lost request must not stall the step:
each request has its own deadline, a timed-out request is cancelled on the engines with
``/abort_request`` (by its ``rid``) before it is retried under a fresh rid (see :func:`attempt_rid`:
SGLang aborts every request whose rid *starts with* the one named), transient failures
(connection errors, 5xx/429, server-side aborts) are retried a bounded number of times with
exponential backoff, and an ``asyncio.Semaphore`` caps how many requests are in flight.
Client errors (4xx) are not retried: they mean our payload and the server's schema disagree.

The router serves /generate, /health and /flush_cache only, so abort, pause/continue and the
weight-update calls must target each engine: give the router client ``abort_urls`` (the
engines) and use one client per engine for control calls.

Weight updates (payloads as in SGLang 0.5.23's io_struct):

* ``update_weights_from_disk``: a checkpoint directory SGLang can load (HF layout).
* ``init_weights_update_group`` + ``update_weights_from_distributed``: SGLang joins an NCCL group
  with the trainer and receives a broadcast of ``names``/``dtypes``/``shapes`` from rank 0.
* ``update_weights_from_tensor``: ``serialized_named_tensors`` holds, per engine TP rank, the
  base64 of a ``ForkingPickler`` dump of ``[(name, tensor), ...]``; SGLang decodes it with a
  restricted unpickler (allowed globals listed in the test fixture) and, for CUDA tensors, maps
  the device field through its patched ``rebuild_cuda_tensor``, which accepts a device index
  or a GPU UUID string; we send the UUID (sender and receiver may number GPUs differently).
  CPU tensors go as ``file_system`` shared memory (``shm.py``): accepted by the real SGLang 0.5.23 on
  CPU; the CUDA-IPC path and SGLang's ``flattened_bucket`` format (which pickles SGLang's own
  classes) are not verified here.
* In 0.5.23 the tensor and distributed updates are refused outside a
  ``begin_weight_update`` / ``end_weight_update`` session.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import random
import time
import uuid
from collections.abc import Sequence

import aiohttp

from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.engine import Completion
from megatron_mtp_rl.rollout.sglang import schema as S
from megatron_mtp_rl.rollout.weight_version import WeightVersionError, stale_answer

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


class SGLangHTTPError(RuntimeError):
    """A non-2xx answer; ``status`` and ``body`` say what the server objected to."""

    def __init__(self, url: str, status: int, body: str):
        super().__init__(f"{url} answered HTTP {status}: {body[:500]}")
        self.url, self.status, self.body = url, status, body


class SGLangRetriesExhausted(RuntimeError):
    """A request failed on every allowed attempt."""


def attempt_rid(base: str, attempt: int = 0, asked_again: int = 0) -> str:
    """The rid one attempt of the request ``base`` is sent under: ``base/attempt.asked_again``.

    SGLang 0.5.23 forwards ``/abort_request`` only for a rid it holds, and its scheduler then aborts
    every request whose rid starts with it (``req.rid.startswith(rid)``: aborting "x-1" also aborts
    "x-10"). Base rids hold no "/", so the attempt in flight is the only request an abort of its rid
    reaches (one attempt of a base at a time).
    """
    if "/" in base:
        raise ValueError(f"request id {base!r}: a base rid must not contain '/'")
    return f"{base}/{attempt}.{asked_again}"


@contextlib.asynccontextmanager
async def cancel_on_error(tasks: Sequence[asyncio.Future]):
    """When the body fails (a request failed for good, or the caller was cancelled), every task is
    cancelled and awaited before the error propagates: no request outlives the call."""
    try:
        yield
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


class SGLangClient:
    """One HTTP endpoint; use as ``async with SGLangClient(url) as c:`` inside a running loop."""

    def __init__(
        self,
        url: str,
        *,
        abort_urls: Sequence[str] | None = None,
        request_timeout_s: float = 600.0,
        control_timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        jitter: float = 0.1,
        max_concurrency: int = 256,
        version_timeout_s: float = 600.0,
        version_poll_s: float = 0.1,
    ):
        self.url = url.rstrip("/")
        self.version_timeout_s = version_timeout_s
        self.version_poll_s = version_poll_s
        self.abort_urls = [u.rstrip("/") for u in (abort_urls if abort_urls is not None else [url])]
        self.request_timeout_s = request_timeout_s
        self.control_timeout_s = control_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.jitter = jitter
        self.max_concurrency = max_concurrency
        self.stats = {"requests": 0, "retries": 0, "timeouts": 0, "aborts_sent": 0, "abort_failures": 0}
        self.stats["stale_answers"] = 0
        self._session: aiohttp.ClientSession | None = None
        self._sem: asyncio.Semaphore | None = None
        self.cancelled: set[str] = set()  # partial rollouts: base rids to stop (abort_base)
        self._inflight: dict[str, str] = {}  # base rid -> the rid of its attempt the server holds

    # -- lifecycle --------------------------------------------------------------------------
    async def __aenter__(self) -> SGLangClient:
        # No connector cap: the semaphore is the limit (aiohttp's default of 100 would hide it).
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=None)
        )
        self._sem = asyncio.Semaphore(self.max_concurrency)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("SGLangClient used outside 'async with'")
        return self._session

    # -- generation -------------------------------------------------------------------------
    def _backoff(self, attempt: int) -> float:
        d = min(self.backoff_max_s, self.backoff_s * (2**attempt))
        return d * (1.0 + self.jitter * random.random())

    async def generate(
        self,
        input_ids: list[int],
        params: SamplingParams,
        *,
        rid: str | None = None,
        sampling_seed: int | None = None,
        weight_version: int | None = None,
        routed_experts_start_len: int | None = None,
        abortable: bool = False,
    ) -> Completion:
        """One prompt → one Completion, with deadline, abort-on-timeout and bounded retries.

        ``abortable`` (partial rollouts): an abort (``/abort_request`` by rid, a pause in abort mode)
        is an answer, the tokens generated so far (rollout/sglang/partial.py); a rid in
        ``self.cancelled`` (:meth:`abort_base`) before it was sent is answered without asking the server.

        ``weight_version``: the weights the answer must come from (rollout/weight_version.py). SGLang's
        request has no such field, so the answer's ``meta_info.weight_version`` is checked: one from
        older weights (the trainer's push has not landed yet) is dropped and asked again, up to
        ``version_timeout_s``; one from newer weights is refused.
        """
        base_rid = rid or uuid.uuid4().hex
        errors: list[str] = []
        version_deadline = time.monotonic() + self.version_timeout_s
        attempt = asked_again = 0
        while attempt <= self.max_retries:
            # A fresh rid per attempt: the aborted one may still be known to the server.
            arid = attempt_rid(base_rid, attempt, asked_again)
            payload = S.build_generate_payload(
                input_ids,
                params,
                rid=arid,
                sampling_seed=sampling_seed,
                routed_experts_start_len=routed_experts_start_len,
            )
            try:
                async with self._sem:
                    if abortable and base_rid in self.cancelled:
                        return Completion([], [], False, meta={"rid": arid, "aborted": True})
                    self.stats["requests"] += 1
                    self._inflight[base_rid] = arid
                    try:
                        async with asyncio.timeout(self.request_timeout_s):
                            body = await self._post_json(S.GENERATE, payload)
                    finally:
                        self._inflight.pop(base_rid, None)
                out = S.parse_generate_response(body, rid=arid, partial_ok=abortable, stops=_stops(params))
                served = out.meta.get("weight_version")
                if stale_answer(weight_version, served) is None:
                    out.meta["attempts"] = attempt + 1
                    return out
                if _version_number(served) > weight_version:
                    raise WeightVersionError(f"{self.url}: {stale_answer(weight_version, served)}")
                if time.monotonic() >= version_deadline:
                    raise WeightVersionError(
                        f"{self.url}: still {stale_answer(weight_version, served)} after {self.version_timeout_s:g}s"
                    )
                self.stats["stale_answers"] += 1
                await asyncio.sleep(self.version_poll_s)
                asked_again += 1
                continue
            except TimeoutError:
                self.stats["timeouts"] += 1
                errors.append(f"attempt {attempt + 1}: no answer within {self.request_timeout_s:g}s")
                await self.abort_request(arid)
            except SGLangHTTPError as e:
                if e.status not in _RETRY_STATUS:
                    raise
                errors.append(f"attempt {attempt + 1}: HTTP {e.status} {e.body[:200]}")
            except S.SGLangAbortedError as e:
                errors.append(f"attempt {attempt + 1}: {e}")
            except aiohttp.ClientError as e:  # connection refused/reset, server went away
                errors.append(f"attempt {attempt + 1}: {type(e).__name__}: {e}")
            if attempt < self.max_retries:
                self.stats["retries"] += 1
                await asyncio.sleep(self._backoff(attempt))
            attempt += 1
        raise SGLangRetriesExhausted(
            f"/generate at {self.url} failed {self.max_retries + 1} times for rid {base_rid}: " + "; ".join(errors)
        )

    async def generate_many(
        self,
        prompts: Sequence[list[int]],
        params: SamplingParams,
        *,
        seed: int,
        rid_prefix: str | None = None,
        weight_version: int | None = None,
        first_index: int = 0,
        routes_start: Sequence[int] | None = None,
    ) -> list[Completion]:
        """All prompts concurrently (bounded by the semaphore), results in prompt order.

        ``first_index``: the index of ``prompts[0]`` in the whole call (rids and sampling seeds follow it).
        ``routes_start`` (R3): per prompt, the ``routed_experts_start_len`` to ask for (None: no routes).

        The first request that fails for good cancels the others and its error is raised.
        """
        prefix = rid_prefix or uuid.uuid4().hex[:12]
        tasks = [
            asyncio.ensure_future(
                self.generate(
                    p,
                    params,
                    rid=f"{prefix}-{i}",
                    sampling_seed=seed * 1_000_003 + i,
                    weight_version=weight_version,
                    routed_experts_start_len=routes_start[i - first_index] if routes_start is not None else None,
                )
            )
            for i, p in enumerate(prompts, start=first_index)
        ]
        async with cancel_on_error(tasks):
            return list(await asyncio.gather(*tasks))

    async def abort_request(self, rid: str) -> None:
        """Best effort: tell every engine to drop every request whose rid starts with ``rid`` (SGLang's
        rule; none: a no-op there, also for a request the engine has not received yet)."""
        await asyncio.gather(*(self._abort_one(u, {"rid": rid}) for u in self.abort_urls))

    def in_flight(self, base_rid: str) -> str | None:
        """The rid of the attempt of ``base_rid`` sent and not answered yet (None: none is)."""
        return self._inflight.get(base_rid)

    async def abort_base(self, base_rid: str) -> None:
        """Partial rollouts: stop the request ``base_rid`` (``generate(..., abortable=True)``) wherever it
        is: its attempt in flight is aborted by rid and answers with its tokens so far; one not sent
        yet (or between attempts) is not sent. Not sent before ``self.cancelled.discard(base_rid)``."""
        self.cancelled.add(base_rid)
        arid = self._inflight.get(base_rid)
        if arid is not None:
            await self.abort_request(arid)

    async def abort_all(self) -> None:
        await asyncio.gather(*(self._abort_one(u, {"abort_all": True}) for u in self.abort_urls))

    async def _abort_one(self, url: str, body: dict) -> None:
        try:
            async with asyncio.timeout(10.0):
                async with self.session.post(url + S.ABORT_REQUEST, json=body) as r:
                    await r.read()
                    r.raise_for_status()
            self.stats["aborts_sent"] += 1
        except (TimeoutError, aiohttp.ClientError) as e:
            self.stats["abort_failures"] += 1
            log.warning("abort %s at %s failed: %s", body, url, e)

    # -- plumbing ---------------------------------------------------------------------------
    async def _request(self, method: str, path: str, *, json_body=None, params=None, url: str | None = None):
        async with self.session.request(method, (url or self.url) + path, json=json_body, params=params) as r:
            text = await r.text()
            if r.status >= 300:
                raise SGLangHTTPError((url or self.url) + path, r.status, text)
            if text[:1] in ("{", "["):  # SGLang answers JSON or plain text depending on the route
                return json.loads(text)
            return text

    async def _post_json(self, path: str, body: dict):
        return await self._request("POST", path, json_body=body)

    async def _control(self, path: str, body: dict | None = None, *, method: str = "POST", params=None):
        """A control-plane call with its own (long) deadline; raises on failure or success=false."""
        async with asyncio.timeout(self.control_timeout_s):
            out = await self._request(method, path, json_body=body, params=params)
        if isinstance(out, dict) and out.get("success") is False:
            raise SGLangHTTPError(self.url + path, 200, str(out.get("message")))
        return out

    # -- health and scheduling control ------------------------------------------------------
    async def health(self, timeout_s: float = 5.0) -> bool:
        """True when /health answers 200 (SGLang answers 503 while starting or unhealthy)."""
        try:
            async with asyncio.timeout(timeout_s):
                async with self.session.get(self.url + S.HEALTH) as r:
                    await r.read()
                    return r.status == 200
        except (TimeoutError, aiohttp.ClientError):
            return False

    async def model_info(self) -> dict:
        return await self._control(S.MODEL_INFO, method="GET")

    async def server_info(self) -> dict:
        return await self._control(S.SERVER_INFO, method="GET")

    async def device(self) -> str | None:
        """The device the engine serves on (its ``/server_info``), asked once; None when it does not say."""
        if not hasattr(self, "_device"):
            try:
                info = await self.server_info()
            except (SGLangHTTPError, aiohttp.ClientError, TimeoutError):
                return None  # not known (yet): asked again next time
            self._device = info.get("device") if isinstance(info, dict) else None
        return self._device

    async def flush_cache(self, timeout_s: float = 0.0) -> None:
        """Drop the radix (prefix) cache; SGLang waits up to ``timeout_s`` for running requests."""
        await self._control(S.FLUSH_CACHE, params={"timeout": str(float(timeout_s))})

    async def pause_generation(self, mode: str = "abort") -> None:
        """'abort' returns running requests as aborted (we retry them), 'retract' re-queues them,
        'in_place' keeps them (then flush_cache fails while they exist)."""
        if mode not in ("abort", "retract", "in_place"):
            raise ValueError(f"pause mode {mode!r}")
        await self._control(S.PAUSE_GENERATION, {"mode": mode})

    async def continue_generation(self, torch_empty_cache: bool | None = None) -> None:
        body = {} if torch_empty_cache is None else {"torch_empty_cache": bool(torch_empty_cache)}
        await self._control(S.CONTINUE_GENERATION, body)

    # -- colocated memory hand-off ----------------------------------------------------------
    async def release_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        """Free the engine's GPU memory (``tags``: "weights", "kv_cache"; None: both) for the trainer."""
        await self._control(S.RELEASE_MEMORY_OCCUPATION, {} if tags is None else {"tags": list(tags)})

    async def resume_memory_occupation(self, tags: Sequence[str] | None = None) -> None:
        await self._control(S.RESUME_MEMORY_OCCUPATION, {} if tags is None else {"tags": list(tags)})

    # -- weight updates ---------------------------------------------------------------------
    async def begin_weight_update(self, selector: str = "all") -> None:
        await self._control(S.BEGIN_WEIGHT_UPDATE, {"selector": selector})

    async def end_weight_update(self) -> None:
        await self._control(S.END_WEIGHT_UPDATE, {})

    async def update_weights_from_disk(
        self,
        model_path: str,
        *,
        load_format: str | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        weight_version: str | None = None,
    ) -> dict:
        body = {"model_path": model_path, "flush_cache": flush_cache, "abort_all_requests": abort_all_requests}
        _put_optional(body, load_format=load_format, weight_version=weight_version)
        return await self._control(S.UPDATE_WEIGHTS_FROM_DISK, body)

    async def init_weights_update_group(
        self,
        master_address: str,
        master_port: int,
        rank_offset: int,
        world_size: int,
        *,
        group_name: str = "weight_update_group",
        backend: str = "nccl",
    ) -> dict:
        """SGLang's ranks join a process group with the trainer (rank 0 = the broadcaster)."""
        body = {
            "master_address": master_address,
            "master_port": int(master_port),
            "rank_offset": int(rank_offset),
            "world_size": int(world_size),
            "group_name": group_name,
            "backend": backend,
        }
        return await self._control(S.INIT_WEIGHTS_UPDATE_GROUP, body)

    async def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> dict:
        return await self._control(S.DESTROY_WEIGHTS_UPDATE_GROUP, {"group_name": group_name})

    async def update_weights_from_distributed(
        self,
        names: Sequence[str],
        dtypes: Sequence[str],
        shapes: Sequence[Sequence[int]],
        *,
        group_name: str = "weight_update_group",
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        weight_version: str | None = None,
        load_format: str | None = None,
        selector: str = "all",
    ) -> dict:
        """Announce one broadcast bucket; the trainer broadcasts the tensors in this order.

        ``dtypes`` are torch attribute names ("bfloat16"); ``selector`` "draft" targets the MTP
        (draft) runner only, "all" both.
        """
        body = {
            "names": list(names),
            "dtypes": [str(d).removeprefix("torch.") for d in dtypes],
            "shapes": [[int(x) for x in s] for s in shapes],
            "group_name": group_name,
            "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests,
            "selector": selector,
        }
        _put_optional(body, weight_version=weight_version, load_format=load_format)
        return await self._control(S.UPDATE_WEIGHTS_FROM_DISTRIBUTED, body)

    async def update_weights_from_tensor(
        self,
        named_tensors=None,
        *,
        serialized: Sequence[str] | None = None,
        tp_size: int = 1,
        load_format: str | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
        weight_version: str | None = None,
        selector: str = "all",
    ) -> dict:
        """Colocated update: tensors travel as CUDA-IPC handles, one payload per engine TP rank.

        Pass ``named_tensors`` ([(name, tensor)]) to serialize here (once per rank: a payload
        must not be shared between ranks, SGLang's IPC refcounting relies on that), or
        ``serialized`` (one base64 string per rank) built elsewhere.
        """
        if (named_tensors is None) == (serialized is None):
            raise ValueError("give exactly one of named_tensors and serialized")
        if serialized is None:
            serialized = [serialize_named_tensors(named_tensors) for _ in range(tp_size)]
        body = {
            "serialized_named_tensors": list(serialized),
            "flush_cache": flush_cache,
            "abort_all_requests": abort_all_requests,
            "selector": selector,
        }
        _put_optional(body, load_format=load_format, weight_version=weight_version)
        return await self._control(S.UPDATE_WEIGHTS_FROM_TENSOR, body)

    # -- router control plane (sglang-router 0.3.2) -----------------------------------------
    async def list_workers(self) -> list[dict]:
        out = await self._request("GET", S.ROUTER_WORKERS)
        return list(out.get("workers", [])) if isinstance(out, dict) else []

    async def add_worker(self, worker_url: str) -> None:
        await self._request("POST", S.ROUTER_WORKERS, json_body={"url": worker_url})


def _stops(params: SamplingParams) -> tuple[int, ...]:
    """The token ids that end a sample (none when EOS is ignored)."""
    return () if params.eos_id is None else tuple(int(t) for t in params.stops)


def _version_number(served: str | None) -> int:
    """SGLang's weight_version as our push number ("default": the weights it started with, 0)."""
    try:
        return int(served)
    except (TypeError, ValueError):
        return 0


def _put_optional(body: dict, **kw) -> None:
    body.update({k: v for k, v in kw.items() if v is not None})


def serialize_named_tensors(named_tensors, *, device_uuid: bool = True) -> str:
    """base64(ForkingPickler dump of [(name, tensor)]), the element format SGLang decodes.

    CPU tensors travel as POSIX shared-memory files SGLang's scheduler maps (``shm.py``: copied there
    unless made by :func:`~megatron_mtp_rl.rollout.sglang.shm.shared_copy`; the ``file_system``
    strategy, since the default one kills SGLang's scheduler), CUDA tensors as IPC handles whose
    device field is replaced by the GPU's UUID when ``device_uuid`` (SGLang's rebuild accepts either).
    Each call takes its own reference on the CPU files: one payload per receiving rank. The sending
    process must keep CUDA tensors alive until SGLang has loaded them.
    """
    import inspect
    from multiprocessing.reduction import ForkingPickler

    import torch
    import torch.multiprocessing.reductions as reductions  # registers torch's reducers

    from megatron_mtp_rl.rollout.sglang.shm import file_system_sharing, shared_copy

    device_pos = list(inspect.signature(reductions.rebuild_cuda_tensor).parameters).index("storage_device")

    class _Pickler(ForkingPickler):
        def reducer_override(self, obj):
            if device_uuid and isinstance(obj, torch.Tensor) and obj.is_cuda:
                fn, args = reductions.reduce_tensor(obj)
                if fn is reductions.rebuild_cuda_tensor:
                    uid = str(torch.cuda.get_device_properties(args[device_pos]).uuid)
                    args = (*args[:device_pos], uid, *args[device_pos + 1 :])
                return fn, args
            return NotImplemented

    payload = [(str(n), shared_copy(t).detach()) for n, t in named_tensors]
    buf = io.BytesIO()
    with file_system_sharing():
        _Pickler(buf).dump(payload)
    return base64.b64encode(buf.getvalue()).decode("ascii")


async def wait_healthy(client: SGLangClient, deadline_s: float, poll_s: float = 0.5) -> None:
    """Poll /health until 200 or raise TimeoutError after ``deadline_s``."""
    end = time.monotonic() + deadline_s
    while not await client.health():
        if time.monotonic() >= end:
            raise TimeoutError(f"{client.url} not healthy after {deadline_s:g}s")
        await asyncio.sleep(poll_s)


__all__ = [
    "SGLangClient",
    "attempt_rid",
    "cancel_on_error",
    "SGLangHTTPError",
    "SGLangRetriesExhausted",
    "serialize_named_tensors",
    "wait_healthy",
]
