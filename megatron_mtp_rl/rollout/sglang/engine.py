"""``RolloutEngine`` backed by SGLang servers (``--rollout-engine sglang``).

The trainer is synchronous, so the engine keeps one private asyncio loop on a daemon thread and
its aiohttp clients live there across calls (connections are reused between rollout steps).
/generate goes to the router (or the only engine); abort, pause/flush/continue and weight
updates go to every engine, because the router does not proxy them.

Weight sync (``cluster/weight_sync.py``) runs inside ``pause_flush_update_continue`` or, when several
pipeline stages push, between :meth:`SGLangEngine.open_update_frame` (rank 0) and
:meth:`SGLangEngine.close_update_frame`, each stage's sender calling :meth:`SGLangEngine.push_bucket`.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import aiohttp

from megatron_mtp_rl.models.generation import GroupStop, SamplingParams
from megatron_mtp_rl.models.routing_replay import route_dtype
from megatron_mtp_rl.rollout.engine import Completion
from megatron_mtp_rl.rollout.sglang import schema as S
from megatron_mtp_rl.rollout.sglang.client import SGLangClient
from megatron_mtp_rl.rollout.sglang.gpu_only import refuse
from megatron_mtp_rl.rollout.sglang.partial import generate_until
from megatron_mtp_rl.rollout.sglang.server import (
    SGLangEngineLost,
    SGLangServerConfig,
    SGLangSupervisor,
)

log = logging.getLogger(__name__)

UpdateFn = Callable[[list[SGLangClient]], Awaitable] | Awaitable


class SGLangEngine:
    """Generates through SGLang's HTTP API; see ``launch`` to start the servers too."""

    def __init__(
        self,
        generate_url: str | None,
        *,
        engine_urls: Sequence[str] | None = None,
        supervisor: SGLangSupervisor | None = None,
        request_timeout_s: float = 600.0,
        control_timeout_s: float = 600.0,
        max_retries: int = 3,
        backoff_s: float = 0.5,
        backoff_max_s: float = 8.0,
        max_concurrency: int = 256,
        version_timeout_s: float = 600.0,
    ):
        # None: no router; each call's prompts are split over the engines (external engines)
        self.generate_url = generate_url.rstrip("/") if generate_url else None
        self.engine_urls = [u.rstrip("/") for u in (engine_urls or [generate_url])]
        self.supervisor = supervisor
        self._client_kw = dict(
            request_timeout_s=request_timeout_s,
            control_timeout_s=control_timeout_s,
            max_retries=max_retries,
            backoff_s=backoff_s,
            backoff_max_s=backoff_max_s,
            version_timeout_s=version_timeout_s,
        )
        self.max_concurrency = max_concurrency
        # R3: (num_hidden_layers, topk, the trunk's MoE layer indices, experts) — answers carry routes,
        # decoded to [tokens, MoE layers, topk] (models/routing_replay.py); None: no routes asked for
        self.route_shape: tuple[int, int, list[int], int] | None = None
        self._rid_prefix = uuid.uuid4().hex[:8]
        self._calls = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sglang-engine-loop", daemon=True)
        self._thread.start()
        self._gen_client: SGLangClient | None = None
        self._engine_clients: list[SGLangClient] = []
        self.unreachable: set[str] = set()  # engine URLs that could not be reached in the current frame
        self._closed = False

    @classmethod
    def launch(cls, config: SGLangServerConfig, **kw) -> SGLangEngine:
        """Start the servers (engines, then the router) and an engine talking to them."""
        sup = SGLangSupervisor(config).start()
        try:
            return cls(sup.generate_url, engine_urls=sup.engine_urls, supervisor=sup, **kw)
        except BaseException:
            sup.close()
            raise

    # -- loop plumbing ----------------------------------------------------------------------
    def submit(self, coro):
        """Schedule ``coro`` on the engine's loop without waiting (a concurrent.futures.Future).

        Distributed weight sync needs this: the engines' HTTP calls block until the trainer's
        broadcasts, which the calling thread performs meanwhile.
        """
        if self._closed:
            raise RuntimeError("SGLangEngine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro):
        if self._closed:
            raise RuntimeError("SGLangEngine is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    async def _clients(self) -> tuple[SGLangClient | None, list[SGLangClient]]:
        """(the generate client — None when calls are split over the engines —, one client per engine)."""
        if not self._engine_clients:
            if self.generate_url is not None:
                self._gen_client = await SGLangClient(
                    self.generate_url, abort_urls=self.engine_urls, max_concurrency=self.max_concurrency,
                    **self._client_kw,
                ).__aenter__()  # fmt: skip
            self._engine_clients = [
                await SGLangClient(u, max_concurrency=self.max_concurrency, **self._client_kw).__aenter__()
                for u in self.engine_urls
            ]
        return self._gen_client, self._engine_clients

    def set_engines(self, generate_url: str | None, engine_urls: Sequence[str]) -> None:
        """Talk to another set of engines from now on (one was restarted elsewhere or left out)."""

        async def _close():
            for c in ([self._gen_client] if self._gen_client else []) + self._engine_clients:
                await c.aclose()

        self._run(_close())
        self._gen_client, self._engine_clients = None, []
        self.unreachable = set()
        self.generate_url = generate_url.rstrip("/") if generate_url else None
        self.engine_urls = [u.rstrip("/") for u in engine_urls]

    def close(self) -> None:
        """Close the clients, the loop and, when this engine launched them, the servers."""
        if self._closed:
            return

        async def _close():
            for c in ([self._gen_client] if self._gen_client else []) + self._engine_clients:
                await c.aclose()

        with contextlib.suppress(Exception):
            self._run(_close())
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
        if self.supervisor is not None:
            self.supervisor.close()

    def __enter__(self) -> SGLangEngine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- RolloutEngine ----------------------------------------------------------------------
    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        seed: int,
        weight_version: int | None = None,
        stop: GroupStop | None = None,
        routes_start: list[int] | None = None,
    ) -> tuple[list[Completion], dict]:
        """Completions in prompt order, plus throughput and speculative-decoding statistics.

        ``weight_version``: only answers from those weights count (rollout/weight_version.py).
        ``stop``: partial rollouts, the rest aborted by rid once enough groups are done (sglang/partial.py).
        ``routes_start`` (R3, multi-turn appends): per prompt, the first position whose route is
        wanted (the earlier ones are known); default 0.
        """
        if self.supervisor is not None:
            self.supervisor.check()
        return self._run(
            self.agenerate(
                prompts, params, seed=seed, weight_version=weight_version, stop=stop, routes_start=routes_start
            )
        )

    async def agenerate(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        *,
        seed: int,
        weight_version: int | None = None,
        stop: GroupStop | None = None,
        routes_start: list[int] | None = None,
    ):
        if self.route_shape is not None and routes_start is None:
            routes_start = [0] * len(prompts)
        gen, engines = await self._clients()
        gens = [gen] if gen is not None else engines
        self._calls += 1
        retries0 = sum(g.stats["retries"] for g in gens)
        timeouts0 = sum(g.stats["timeouts"] for g in gens)
        t0 = time.perf_counter()
        # contiguous shares (a sample's seed follows its index in the call, whichever engine serves it)
        bounds = [len(prompts) * k // len(gens) for k in range(len(gens) + 1)]
        if stop is not None:
            prefix = f"{self._rid_prefix}-{self._calls}"
            outs = await generate_until(gens, prompts, params, stop, seed=seed, rid_prefix=prefix,
                                        weight_version=weight_version, routes_start=routes_start)  # fmt: skip
            shares = [outs]
        else:
            shares = await self._shares(gens, bounds, prompts, params, seed, weight_version, routes_start)
        outs = [o for share in shares for o in share]
        if self.route_shape is not None:
            for o, p, start in zip(outs, prompts, routes_start):
                o.routes = self._routes(o, len(p) + len(o.response_ids) - 1 - start)
        seconds = time.perf_counter() - t0
        return outs, self._stats(gens, outs, seconds, retries0, timeouts0)

    async def _shares(self, gens, bounds, prompts, params, seed, weight_version, routes_start=None):
        return await asyncio.gather(
            *(
                g.generate_many(
                    prompts[a:b],
                    params,
                    seed=seed,
                    rid_prefix=f"{self._rid_prefix}-{self._calls}",
                    weight_version=weight_version,
                    first_index=a,
                    routes_start=routes_start[a:b] if routes_start is not None else None,
                )  # fmt: skip
                for g, a, b in zip(gens, bounds, bounds[1:])
            )
        )

    def _stats(self, gens, outs, seconds, retries0, timeouts0) -> dict:
        tokens = sum(len(o.response_ids) for o in outs)
        stats = {
            "rollout/gen_tokens_per_s": tokens / max(seconds, 1e-9),
            "rollout/sglang_retries": sum(g.stats["retries"] for g in gens) - retries0,
            "rollout/sglang_timeouts": sum(g.stats["timeouts"] for g in gens) - timeouts0,
        }
        # Token-weighted accept length: Σ completion tokens / Σ verify rounds (SGLang's
        # per-request spec_accept_length is completion_tokens / spec_verify_ct).
        spec = [o for o in outs if o.meta.get("spec_verify_ct")]
        if spec:
            toks = sum(o.meta.get("completion_tokens", len(o.response_ids)) for o in spec)
            stats["rollout/spec_accept_len"] = toks / sum(o.meta["spec_verify_ct"] for o in spec)
        return stats

    def _routes(self, out: Completion, rows: int):
        """The answer's routes of the trunk's MoE layers, compact (uint8/int16)."""
        b64 = out.meta.pop("routed_experts", None)
        if b64 is None and out.meta.get("aborted"):
            # stopped before it was routed (never sent, or aborted while queued): a partial rollout's
            # next continuation routes these positions (rollout/partial.py:continued_routes)
            return None
        if b64 is None:
            raise S.SGLangResponseError(
                "the engine returned no routed_experts: start SGLang with --enable-return-routed-experts "
                "(--use-rollout-routing-replay)"
            )
        layers, topk, moe, experts = self.route_shape
        full = S.decode_routed_experts(b64, layers, topk)
        if full.shape[0] != rows:
            raise S.SGLangResponseError(f"routed_experts has {full.shape[0]} rows, expected {rows}")
        routes = full[:, moe]
        if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= experts):
            raise S.SGLangResponseError(f"routed_experts names an expert outside 0..{experts - 1}")
        return routes.to(route_dtype(experts))

    def sync_weights(self) -> None:
        raise NotImplementedError(
            "SGLangEngine.sync_weights: mapping Megatron parameters (TP/EP shards, MTP layers as the "
            "SGLang draft model) to SGLang weight names is not implemented yet. Until it is, push "
            "weights yourself inside SGLangEngine.pause_flush_update_continue(...) with "
            "SGLangClient.update_weights_from_tensor / _from_distributed / _from_disk."
        )

    # -- control calls to every engine ------------------------------------------------------
    async def _each(self, call) -> list:
        """``call(client)`` on every engine still reachable in this frame, concurrently.

        An engine that cannot be reached (its server or node went away) is left out of the rest of
        the frame with a warning: with ``--ray`` it is restarted and re-synced before the next
        generation (cluster/engine_recovery.py); locally its supervisor restarts it. Any other
        failure is raised, and so is losing every engine.
        """
        _, engines = await self._clients()
        live = [c for c in engines if c.url not in self.unreachable]
        results = await asyncio.gather(*(call(c) for c in live), return_exceptions=True)
        for c, r in zip(live, results):
            if isinstance(r, aiohttp.ClientConnectionError):
                self.unreachable.add(c.url)
                log.warning("SGLang engine %s cannot be reached (%s): left out of this update", c.url, r)
            elif isinstance(r, BaseException):
                raise r
        if len(self.unreachable) >= len(engines):
            raise SGLangEngineLost(self._lost_message(sorted(self.unreachable)))
        return [r for r in results if not isinstance(r, BaseException)]

    def _lost_message(self, urls: list[str]) -> str:
        """One line: which engines went away and where their logs are (the supervisor's, when it started them)."""
        parts = []
        for url in urls:
            proc = next((p for p in self.supervisor.engines if p.url == url), None) if self.supervisor else None
            if proc is None:
                parts.append(f"{url} (started elsewhere: see its own log)")
                continue
            log_path = self.supervisor.log_dir / f"{proc.name}.log" if self.supervisor.log_dir else None
            last = self.supervisor.last_log_line(proc) if log_path else ""
            parts.append(f"{proc.name} at {url}, log {log_path}" + (f" (last line: {last})" if last else ""))
        return "SGLang engine(s) went away during a control request: " + "; ".join(parts)

    async def cpu_engines(self) -> list[str]:
        """The engines that serve on CPU, by their own ``/server_info`` (GPU-only requests are refused there)."""
        _, engines = await self._clients()
        devices = await asyncio.gather(*(c.device() for c in engines))
        return [c.url for c, d in zip(engines, devices) if d == "cpu"]

    def refuse_on_cpu(self, what: str) -> None:
        """Raise a one-line :class:`~megatron_mtp_rl.rollout.sglang.gpu_only.GPUOnlyError` when an engine is on CPU."""
        cpu = self._run(self.cpu_engines())
        if cpu:
            refuse(what, cpu)

    # -- colocated memory hand-off (every engine) ------------------------------------------
    def release_memory(self, tags: list[str] | None = None) -> None:
        self.refuse_on_cpu("/release_memory_occupation (the colocated memory hand-off)")
        self._run(self._each(lambda c: c.release_memory_occupation(tags)))

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self.refuse_on_cpu("/resume_memory_occupation (the colocated memory hand-off)")
        self._run(self._each(lambda c: c.resume_memory_occupation(tags)))

    # -- weight-update frame ----------------------------------------------------------------
    def open_update_frame(self, pause_mode: str = "abort", flush_timeout_s: float = 60.0) -> None:
        """Pause every engine, flush, begin the weight-update session (the first half of the frame)."""
        self.unreachable.clear()  # a frame asks every engine again

        async def go():
            await self._each(lambda c: c.pause_generation(pause_mode))
            try:
                await self._each(lambda c: c.flush_cache(flush_timeout_s))
                await self._each(lambda c: c.begin_weight_update())
            except BaseException:
                await self._each_quietly(lambda c: c.continue_generation())
                raise

        self._run(go())

    async def _each_quietly(self, call) -> None:
        """``call`` on every reachable engine, whatever happens (the engines must not stay paused)."""
        _, engines = await self._clients()
        await asyncio.gather(*(call(c) for c in engines if c.url not in self.unreachable), return_exceptions=True)

    def close_update_frame(self, flush_timeout_s: float = 60.0) -> None:
        """End the session, flush the caches the new weights invalidate and continue every engine."""

        async def go():
            try:
                await self._each(lambda c: c.end_weight_update())
                await self._each(lambda c: c.flush_cache(flush_timeout_s))
            finally:
                await self._each(lambda c: c.continue_generation())

        self._run(go())

    def push_bucket(self, bucket: list, weight_version: str) -> None:
        """Send one bucket of named tensors to every engine (``/update_weights_from_tensor``), inside an open frame.

        CPU tensors are copied into shared memory once for all engines (``shm.py``); the copy is freed
        when every engine has answered.
        """
        from megatron_mtp_rl.rollout.sglang.shm import shared_bucket

        if any(t.is_cuda for _, t in bucket):
            self.refuse_on_cpu("a CUDA-IPC tensor push (/update_weights_from_tensor of GPU tensors)")
        shared = shared_bucket(bucket)
        self._run(
            self._each(lambda c: c.update_weights_from_tensor(shared, flush_cache=False, weight_version=weight_version))
        )

    def pause_flush_update_continue(self, update: UpdateFn, **kw):
        """Synchronous ``apause_flush_update_continue``."""
        return self._run(self.apause_flush_update_continue(update, **kw))

    async def apause_flush_update_continue(
        self,
        update: UpdateFn,
        *,
        pause_mode: str = "abort",
        flush_timeout_s: float = 60.0,
        weight_update_session: bool = True,
        session_selector: str = "all",
    ):
        """Pause every engine → flush their caches → run ``update`` → continue them.

        ``update`` is an awaitable, or a callable given the per-engine clients that returns one.
        With ``weight_update_session`` the update runs between /begin_weight_update and
        /end_weight_update, which SGLang 0.5.23 requires for tensor and distributed updates
        (pass False for ``update_weights_from_disk``). Engines are continued even when the
        update fails (the error is re-raised), so a failed sync never leaves them paused.
        """
        self.unreachable.clear()
        await self._each(lambda c: c.pause_generation(pause_mode))
        try:
            await self._each(lambda c: c.flush_cache(flush_timeout_s))
            if weight_update_session:
                await self._each(lambda c: c.begin_weight_update(session_selector))
            try:
                _, engines = await self._clients()
                live = [c for c in engines if c.url not in self.unreachable]
                aw = update(live) if callable(update) else update
                result = await aw if inspect.isawaitable(aw) else aw
            finally:
                if weight_update_session:
                    await self._each(lambda c: c.end_weight_update())
        finally:
            await self._each_quietly(lambda c: c.continue_generation())
        return result


__all__ = ["SGLangEngine"]
