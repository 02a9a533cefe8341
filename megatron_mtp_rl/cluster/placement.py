"""Where a ``--ray --rollout-engine sglang`` job runs: one placement group, trainer and engine bundles.

The group holds one bundle per trainer rank (1 GPU each) and, ``disaggregated``, one bundle per
SGLang engine (``--rollout-engine-tp`` GPUs, so all on one node); ``colocated`` engines share the
trainers' bundles (engine e on the GPUs of trainer bundles e·tp … e·tp+tp−1, which must be on one
node). An engine is a Ray actor that starts ``--rollout-server-cmd`` on its own node, bound to
that node's IP, with its GPUs visible; the router is an actor on the head node (the driver's)
that is told every engine. Trainer rank 0 starts them (it exports the model they load first)
through :class:`RayEngineGroup`, which stands where the local ``SGLangSupervisor`` stands.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
from dataclasses import dataclass, field

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy, PlacementGroupSchedulingStrategy

COLOCATED_SHARE = 0.5  # of a trainer bundle's GPU (and CPU) an engine actor takes when colocated


@dataclass(frozen=True)
class Layout:
    """The bundles of the placement group and which of them each actor uses."""

    bundles: list[dict]
    trainer_bundles: list[int]
    engine_bundles: list[int]  # the bundle each engine actor is scheduled in
    engine_gpus: int  # GPUs per engine (its TP size; 0 on a CPU-only job)
    colocated: bool


def plan(num_trainers: int, num_engines: int, engine_tp: int, placement: str, gpus: bool) -> Layout:
    """Bundles for ``num_trainers`` trainers and ``num_engines`` engines of ``engine_tp`` GPUs."""
    g = 1 if gpus else 0
    trainers = [{"CPU": 1, "GPU": g} if g else {"CPU": 1} for _ in range(num_trainers)]
    if placement == "colocated":
        if num_engines * engine_tp > num_trainers:
            raise ValueError(
                f"colocated: {num_engines} engine(s) × TP {engine_tp} need {num_engines * engine_tp} trainer GPUs, "
                f"the job has {num_trainers} (--ray-num-trainers)"
            )
        return Layout(trainers, list(range(num_trainers)), [e * engine_tp for e in range(num_engines)],
                      engine_tp * g, True)  # fmt: skip
    engines = [{"CPU": 1, "GPU": engine_tp * g} if g else {"CPU": 1} for _ in range(num_engines)]
    return Layout(trainers + engines, list(range(num_trainers)),
                  list(range(num_trainers, num_trainers + num_engines)), engine_tp * g, False)  # fmt: skip


def in_bundle(pg, index: int) -> PlacementGroupSchedulingStrategy:
    return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=index)


def free_port(host: str) -> int:
    """A free port on ``host`` below the ephemeral range (where client sockets could take it first)."""
    lo, hi = 20000, 32000
    for _ in range(200):
        port = random.randint(lo, hi)
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return port
            except OSError:
                continue
    raise RuntimeError(f"no free port on {host} in [{lo}, {hi}]")


def where() -> dict:
    """This actor's node id, node IP and the GPU ids Ray gave it."""
    ctx = ray.get_runtime_context()
    return {
        "node": ctx.get_node_id(),
        "ip": ray.util.get_node_ip_address(),
        "gpus": [str(g) for g in ray.get_gpu_ids()],
    }


def placement_line(kind: str, index: int, info: dict) -> str:
    return f"placement: {kind} {index} node={info['node']} gpus={','.join(info['gpus']) or '-'}"


@ray.remote
class EngineActor:
    """One SGLang engine: its server process on this actor's node (IP, GPUs), watched by a supervisor."""

    def __init__(self, index: int, gpu_ids: list[str] | None = None):
        self.index = index
        self.gpu_ids = gpu_ids  # colocated: the trainer GPUs it shares (else the GPUs Ray gave it)
        self.supervisor = None

    def where(self) -> dict:
        info = where()
        if self.gpu_ids is not None:
            info["gpus"] = list(self.gpu_ids)
        return info

    def start(self, server_cfg) -> str:
        """Start the server (``server_cfg``: a ``SGLangServerConfig`` for one engine, host/port set here); its URL."""
        from dataclasses import replace

        from megatron_mtp_rl.rollout.sglang.server import SGLangSupervisor

        info = self.where()
        env = dict(server_cfg.env)
        if info["gpus"]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(info["gpus"])
        ip = info["ip"]
        cfg = replace(server_cfg, host=ip, port=free_port(ip), num_engines=1, use_router=False, env=env,
                      log_dir=os.path.join(server_cfg.log_dir, f"engine{self.index}") if server_cfg.log_dir else None,
                      engine_flags=[*server_cfg.engine_flags, "--base-gpu-id", "0"])  # fmt: skip
        self.supervisor = SGLangSupervisor(cfg).start()
        return self.supervisor.engine_urls[0]

    def alive(self) -> bool:
        return self.supervisor is not None and not any(e.failed for e in self.supervisor.engines)

    def restarts(self) -> int:
        """How often its supervisor restarted the server here: each one came back with the initial weights."""
        return 0 if self.supervisor is None else sum(e.restarts for e in self.supervisor.engines)

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()
            self.supervisor = None


@ray.remote
class RouterActor:
    """The sglang-router on the head node, told every engine."""

    def __init__(self):
        self.supervisor = None

    def where(self) -> dict:
        return where()

    def start(self, server_cfg, engine_urls: list[str]) -> str:
        from dataclasses import replace

        from megatron_mtp_rl.rollout.sglang.server import SGLangSupervisor

        ip = where()["ip"]
        cfg = replace(server_cfg, host=ip, router_port=free_port(ip), num_engines=0, use_router=True)
        self.supervisor = SGLangSupervisor(cfg).start()
        self.add(engine_urls)
        return self.supervisor.router_url

    def add(self, urls: list[str]) -> None:
        from megatron_mtp_rl.rollout.sglang.schema import ROUTER_WORKERS
        from megatron_mtp_rl.rollout.sglang.server import _http_json

        for u in urls:
            _http_json("POST", self.supervisor.router_url + ROUTER_WORKERS, {"url": u})

    def remove(self, urls: list[str]) -> None:
        """``DELETE /workers/{id}`` for each listed worker at one of ``urls``."""
        from megatron_mtp_rl.rollout.sglang.schema import ROUTER_WORKERS
        from megatron_mtp_rl.rollout.sglang.server import _http_json

        base = self.supervisor.router_url + ROUTER_WORKERS
        for w in _http_json("GET", base)["workers"]:
            if str(w.get("url", "")).rstrip("/") in {u.rstrip("/") for u in urls}:
                _http_json("DELETE", f"{base}/{w['id']}")

    def workers(self) -> list[str]:
        from megatron_mtp_rl.rollout.sglang.schema import ROUTER_WORKERS
        from megatron_mtp_rl.rollout.sglang.server import _http_json

        return [w["url"] for w in _http_json("GET", self.supervisor.router_url + ROUTER_WORKERS)["workers"]]

    def stop(self) -> None:
        if self.supervisor is not None:
            self.supervisor.close()
            self.supervisor = None


@dataclass
class Recovery:
    """What :meth:`RayEngineGroup.recover` did: engines to re-sync before the router sees them, engines gone."""

    resync: list[str]  # URLs of restarted engines (held out of the router until re-synced)
    lines: list[str]  # one per event, for the log
    dropped: int = 0


@dataclass
class RayEngineGroup:
    """The engine and router actors the driver placed; trainer rank 0 starts them (``start``).

    An engine actor that dies (or whose node does) is started again in its bundle by :meth:`recover`,
    which trainer rank 0 calls before every generation (cluster/engine_recovery.py does the rest:
    every rank learns the new URLs, the weights are pushed again, then the router gets the engine).
    An engine its bundle cannot take back within ``replace_timeout_s`` (its node is gone and no
    other has room) is left out, and the run goes on with fewer.
    """

    engines: list
    router: object | None
    colocated: bool = False  # engines on the trainers' GPUs: memory hand-off each step (cluster/colocated.py)
    engine_urls: list[str] = field(default_factory=list)
    router_url: str | None = None
    on_restart: object = None  # SGLangSupervisor's hook (restarts happen inside each engine actor)
    pg: object = None  # the placement group and layout, to put a dead engine back in its bundle
    layout: Layout | None = None
    trainer_infos: list[dict] = field(default_factory=list)
    replace_timeout_s: float = 300.0
    server_cfg: object = None
    indices: list[int] = field(default_factory=list)  # engine e's place in the layout (engines dropped: fewer)
    restarts_seen: list[int] = field(default_factory=list)

    def start(self, server_cfg) -> RayEngineGroup:
        """Every engine (its server healthy), then the router told them all; a failed start is one line."""
        from megatron_mtp_rl.errors import EngineStartError

        self.server_cfg = server_cfg
        self.indices = list(range(len(self.engines)))
        self.restarts_seen = [0] * len(self.engines)
        try:
            self.engine_urls = ray.get([e.start.remote(server_cfg) for e in self.engines])
            if self.router is not None:
                self.router_url = ray.get(self.router.start.remote(server_cfg, self.engine_urls))
                listed = ray.get(self.router.workers.remote())
                if sorted(listed) != sorted(self.engine_urls):
                    raise EngineStartError(
                        f"router {self.router_url} lists {listed}, not the engines {self.engine_urls}"
                    )
        except ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, EngineStartError):
                raise EngineStartError(str(err.cause)) from None
            raise
        return self

    @property
    def generate_url(self) -> str:
        return self.router_url or self.engine_urls[0]

    def check(self) -> None:
        """Before each generate call: at least one engine is there (recover() replaces dead ones)."""
        from megatron_mtp_rl.rollout.sglang.server import SGLangServerError

        if not self.engine_urls:
            raise SGLangServerError("no SGLang engine is left: every engine actor died and none could be re-placed")

    def _status(self, e: int) -> tuple[bool, int]:
        """(alive, restarts) of engine actor ``e``; a dead actor or a failed server is (False, ·)."""
        try:
            ok, restarts = ray.get([self.engines[e].alive.remote(), self.engines[e].restarts.remote()], timeout=60)
            return bool(ok), int(restarts)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return False, 0

    def recover(self, fault_kill: bool = False) -> Recovery:
        """Put every dead engine back in its bundle (server started, out of the router until re-synced).

        ``fault_kill``: kill the last engine actor first (``MTP_RL_FAULTS=kill_engine_actor@N``, the tests).
        """
        if fault_kill and self.engines:
            ray.kill(self.engines[-1], no_restart=True)
        out = Recovery([], [])
        keep = []
        for e, actor in enumerate(self.engines):
            ok, restarts = self._status(e)
            index, old = self.indices[e], self.engine_urls[e]
            if ok and restarts == self.restarts_seen[e]:
                keep.append(e)
                continue
            self.unroute([old])
            if ok:  # its server was restarted inside the actor: same URL, the initial weights
                self.restarts_seen[e] = restarts
                out.resync.append(old)
                out.lines.append(f"engine {index}: its server restarted on its node; re-syncing before it serves again")
                keep.append(e)
                continue
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(actor, no_restart=True)
            try:
                new, info = self._replace(index)
                url = ray.get(new.start.remote(self.server_cfg), timeout=self.server_cfg.startup_timeout_s + 60)
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
                out.dropped += 1
                out.lines.append(
                    f"engine {index}: its actor died and could not be re-placed in its bundle "
                    f"({type(err).__name__}); going on with the other engines"
                )
                continue
            self.engines[e], self.engine_urls[e], self.restarts_seen[e] = new, url, 0
            out.resync.append(url)
            out.lines.append(f"engine {index}: its actor died; restarted {placement_line('engine', index, info)[11:]}")
            keep.append(e)
        if out.dropped:
            self.engines = [self.engines[e] for e in keep]
            self.engine_urls = [self.engine_urls[e] for e in keep]
            self.indices = [self.indices[e] for e in keep]
            self.restarts_seen = [self.restarts_seen[e] for e in keep]
        self._reroute(exclude=set(out.resync))
        return out

    def _reroute(self, exclude: set[str]) -> None:
        """Give back to the router the serving engines it dropped (a health check missed under load)."""
        if self.router is None:
            return
        try:
            listed = set(ray.get(self.router.workers.remote(), timeout=60))
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
            return
        self.route([u for u in self.engine_urls if u not in listed and u not in exclude])

    def _replace(self, index: int):
        """A new actor for engine ``index`` in its bundle; (actor, where) once Ray has placed it."""
        actor = engine_actor(self.pg, self.layout, index, self.trainer_infos)
        try:
            info = ray.get(actor.where.remote(), timeout=self.replace_timeout_s)
        except BaseException:
            ray.kill(actor, no_restart=True)
            raise
        return actor, info

    def unroute(self, urls: list[str]) -> None:
        """Take engines out of the router (its own health checks may have done it already)."""
        if self.router is not None and urls:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.get(self.router.remove.remote(urls), timeout=60)

    def route(self, urls: list[str]) -> None:
        """Give (re-synced) engines to the router."""
        if self.router is not None and urls:
            ray.get(self.router.add.remote(urls), timeout=60)

    def close(self) -> None:
        """Stop the servers (the driver ends the actors and the placement group)."""
        for a in ([self.router] if self.router is not None else []) + list(self.engines):
            try:
                ray.get(a.stop.remote(), timeout=60)
            except ray.exceptions.RayError:
                pass


def engine_actor(pg, layout: Layout, e: int, trainer_infos: list[dict]):
    """Engine ``e``'s actor, scheduled in its bundle (colocated: on the GPUs of the trainers it shares)."""
    b = layout.engine_bundles[e]
    if layout.colocated:
        tp = max(1, layout.engine_gpus)
        shared = trainer_infos[b : b + tp]
        if len({t["node"] for t in shared}) > 1:
            raise ValueError(f"colocated engine {e}: its {tp} trainer GPUs are on different nodes")
        gpus = [g for t in shared for g in t["gpus"]]
        opts = dict(num_cpus=0, num_gpus=COLOCATED_SHARE if layout.engine_gpus else 0)
        return EngineActor.options(scheduling_strategy=in_bundle(pg, b), **opts).remote(e, gpus)
    return EngineActor.options(num_cpus=1, num_gpus=layout.engine_gpus, scheduling_strategy=in_bundle(pg, b)).remote(e)


def place_engines(pg, layout: Layout, trainer_infos: list[dict], *, with_router: bool) -> tuple[list, object, list]:
    """Engine actors in their bundles, the router on the driver's node; (engines, router, placement lines)."""
    engines = [engine_actor(pg, layout, e, trainer_infos) for e in range(len(layout.engine_bundles))]
    infos = ray.get([a.where.remote() for a in engines])
    lines = [placement_line("engine", e, info) for e, info in enumerate(infos)]
    router = None
    if with_router:
        head = ray.get_runtime_context().get_node_id()
        router = RouterActor.options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)
        ).remote()
        lines.append(placement_line("router", 0, ray.get(router.where.remote())))
    return engines, router, lines
