"""Start, watch and stop the SGLang engines (and the router in front of them).

Engines are ``python -m sglang.launch_server`` processes, one per ``num_engines``, each on its
own port and GPUs (``--base-gpu-id``). The router (``python -m sglang_router.launch_router
--worker-urls ...``) is started only once every engine answers /health, because it probes its
workers at start-up. A watcher thread restarts an engine whose process died and makes sure the
router knows it again: sglang-router 0.3.2 registers workers with ``POST /workers {"url"}`` and
lists them with ``GET /workers``, and may drop a worker that failed its health checks, so the
watcher re-adds any engine missing from that list. Everything runs in its own process group and
is stopped by ``close()``. Engines get ``SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=false`` by
default (see ``DEFAULT_ENGINE_ENV``) so /health does not stall while a weight sync pauses them.

Our command line forwards SGLang flags by prefix: ``--sglang-mem-fraction-static 0.8`` reaches
the engines as ``--mem-fraction-static 0.8`` (so do the speculative flags, e.g.
``--sglang-speculative-algorithm EAGLE --sglang-speculative-num-steps 3``), and
``--sglang-router-policy round_robin`` reaches the router as ``--policy round_robin`` (SGLang
itself has no ``--router-*`` flag, so the two prefixes cannot collide).

``server_cmd`` / ``router_cmd`` are the command prefixes, injectable so tests can start a fake.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

# The --sglang-* passthrough is split off the command line in flags.py (torch-free, before argparse).
from megatron_mtp_rl.errors import EngineFailed, EngineStartError
from megatron_mtp_rl.flags import ENGINE_PREFIX, ROUTER_PREFIX, split_passthrough_args  # noqa: F401
from megatron_mtp_rl.rollout.sglang import schema as S

log = logging.getLogger(__name__)


# SGLang's /health runs a one-token generation by default; while a weight sync pauses the
# engine that probe stalls, answers 503 after SGLANG_HEALTH_CHECK_TIMEOUT and marks the server
# unhealthy, so the router's health checker could drop it. Process death is what we watch, so
# /health only has to say "started" (override through SGLangServerConfig.env or the environment).
DEFAULT_ENGINE_ENV = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "false"}


class SGLangServerError(RuntimeError):
    """An engine or the router did not come up (or stay up)."""


class SGLangStartError(SGLangServerError, EngineStartError):
    """An engine or the router exited before it answered /health (one line: command, exit code, log)."""


class SGLangEngineLost(SGLangServerError, EngineFailed):
    """Every engine went away in the middle of a request (one line: the engines, their logs)."""


def _flag_given(flags: Sequence[str], *names: str) -> bool:
    return any(f == n or f.startswith(n + "=") for f in flags for n in names)


@dataclass
class SGLangServerConfig:
    """What to launch. Ports: engine i listens on ``port + i * port_stride``."""

    model_path: str
    num_engines: int = 1
    tp_size: int = 1
    host: str = "127.0.0.1"
    port: int = 30000
    port_stride: int = 10
    router_port: int = 30100
    use_router: bool | None = None  # None: a router when there is more than one engine
    engine_flags: list[str] = field(default_factory=list)  # already translated (--mem-fraction-static 0.8)
    router_flags: list[str] = field(default_factory=list)
    server_cmd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "sglang.launch_server"])
    router_cmd: list[str] = field(default_factory=lambda: [sys.executable, "-m", "sglang_router.launch_router"])
    gpus_per_engine: int | None = None  # default tp_size; engine i gets --base-gpu-id i * gpus_per_engine
    startup_timeout_s: float = 900.0  # model load + CUDA graph capture
    restart_timeout_s: float = 900.0
    health_poll_s: float = 1.0
    watch_interval_s: float = 2.0
    max_restarts: int = 3  # per engine
    hung_after: int = 5  # consecutive failed /health probes (one per watch round) that mark an engine hung
    log_dir: str | None = None
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_argv(cls, model_path: str, argv: Sequence[str], **kw) -> SGLangServerConfig:
        """Config whose passthrough flags come from ``--sglang-*`` / ``--sglang-router-*`` in argv."""
        engine, router, _ = split_passthrough_args(argv)
        return cls(model_path=model_path, engine_flags=engine, router_flags=router, **kw)


@dataclass
class _Proc:
    name: str
    url: str
    cmd: list[str]
    popen: subprocess.Popen | None = None
    restarts: int = 0
    failed: bool = False
    unhealthy: int = 0  # consecutive failed /health probes while the process is alive


def _http_status(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def _http_json(method: str, url: str, body=None, timeout: float = 10.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        raw = r.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()


class SGLangSupervisor:
    """Owns the engine and router processes; ``with SGLangSupervisor(cfg) as sup: ...``."""

    def __init__(self, config: SGLangServerConfig):
        self.config = c = config
        self.use_router = c.use_router if c.use_router is not None else c.num_engines > 1
        self.log_dir: Path | None = Path(c.log_dir) if c.log_dir else None  # made at the first start
        self.engines = [
            _Proc(f"engine{i}", f"http://{c.host}:{c.port + i * c.port_stride}", self.engine_command(i))
            for i in range(c.num_engines)
        ]
        self.router = (
            _Proc("router", f"http://{c.host}:{c.router_port}", self.router_command()) if self.use_router else None
        )
        self.events: list[tuple[float, str, str]] = []  # (time, what, who): start order, restarts
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._logs: list = []
        # Called with an engine's URL after it was restarted and is healthy, before it is
        # registered with the router again: the trainer pushes its current weights there.
        self.on_restart = None

    # -- commands ---------------------------------------------------------------------------
    def engine_command(self, i: int) -> list[str]:
        c = self.config
        cmd = [*c.server_cmd, "--model-path", c.model_path, "--host", c.host]
        cmd += ["--port", str(c.port + i * c.port_stride), "--tp-size", str(c.tp_size)]
        if not _flag_given(c.engine_flags, "--base-gpu-id"):
            cmd += ["--base-gpu-id", str(i * (c.gpus_per_engine or c.tp_size))]
        return cmd + list(c.engine_flags)

    def router_command(self) -> list[str]:
        c = self.config
        cmd = [*c.router_cmd, "--host", c.host, "--port", str(c.router_port)]
        return cmd + ["--worker-urls", *(e.url for e in self.engines), *c.router_flags]

    @property
    def engine_urls(self) -> list[str]:
        return [e.url for e in self.engines]

    @property
    def router_url(self) -> str | None:
        return self.router.url if self.router else None

    @property
    def generate_url(self) -> str:
        """Where /generate goes: the router, or the only engine."""
        return self.router.url if self.router else self.engines[0].url

    # -- lifecycle --------------------------------------------------------------------------
    def ports(self) -> list[tuple[int, str]]:
        """(port, what) of everything this supervisor starts, for the pre-start check."""
        out = [(int(e.url.rsplit(":", 1)[1]), e.name) for e in self.engines]
        return out + ([(self.config.router_port, "router")] if self.router else [])

    def start(self) -> SGLangSupervisor:
        c = self.config
        try:
            for e in self.engines:
                self._spawn(e)
            deadline = time.monotonic() + c.startup_timeout_s
            for e in self.engines:
                self._wait_healthy(e, deadline)
            if self.router:
                self._spawn(self.router)
                self._wait_healthy(self.router, time.monotonic() + c.startup_timeout_s)
        except BaseException:
            self.close()
            raise
        self._watcher = threading.Thread(target=self._watch, name="sglang-supervisor", daemon=True)
        self._watcher.start()
        return self

    def close(self) -> None:
        """Stop the watcher, then the router, then the engines (SIGTERM, then SIGKILL)."""
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=max(5.0, 2 * self.config.watch_interval_s))
        if self.router:
            self._terminate(self.router)
        for e in self.engines:  # SIGTERM all first, so their shutdowns overlap
            self._signal(e, signal.SIGTERM)
        for e in self.engines:
            self._terminate(e)
        for f in self._logs:
            f.close()
        self._logs.clear()

    def __enter__(self) -> SGLangSupervisor:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self) -> None:
        """Raise if an engine could not be brought back (called before each rollout)."""
        failed = [e.name for e in self.engines if e.failed]
        if failed:
            raise SGLangEngineLost(  # one line at the CLI (errors.EngineFailed), not a traceback
                f"SGLang engine(s) {failed} died and could not be restarted; logs in {self.log_dir}"
            )

    # -- internals --------------------------------------------------------------------------
    def _event(self, what: str, who: str) -> None:
        with self._lock:
            self.events.append((time.monotonic(), what, who))
        log.info("sglang supervisor: %s %s", what, who)

    def _spawn(self, p: _Proc) -> None:
        if self.log_dir is None:
            self.log_dir = Path(tempfile.mkdtemp(prefix="sglang-logs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.log_dir / f"{p.name}.log", "ab")  # kept open while the process runs
        self._logs.append(f)
        defaults = DEFAULT_ENGINE_ENV if p is not self.router else {}
        env = {**defaults, **os.environ, **self.config.env}
        # Own session (the whole tree can be signalled), and killed by the kernel if this process dies.
        guarded = [sys.executable, "-m", "megatron_mtp_rl.rollout.die_with_parent", str(os.getpid()), *p.cmd]
        p.popen = subprocess.Popen(guarded, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._event("start", p.name)

    def _log_tail(self, p: _Proc, n: int = 30) -> str:
        try:
            lines = (self.log_dir / f"{p.name}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def last_log_line(self, p: _Proc) -> str:
        """The last non-empty line of ``p``'s log (for one-line errors)."""
        lines = [line.strip() for line in self._log_tail(p, 5).splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def _wait_healthy(self, p: _Proc, deadline: float) -> None:
        while True:
            if self._stop.is_set():
                raise SGLangServerError(f"supervisor closed while waiting for {p.name}")
            if self._exited(p):
                self._terminate(p)  # reap it and whatever it left behind
                tail = " | ".join(line.strip() for line in self._log_tail(p, 5).splitlines() if line.strip())
                raise SGLangStartError(
                    f"SGLang {p.name} exited with code {p.popen.returncode} before answering /health; "
                    f"command: {' '.join(p.cmd)}; last lines of {self.log_dir / (p.name + '.log')}: {tail or '(empty)'}"
                )
            if _http_status(p.url + S.HEALTH) == 200:
                self._event("healthy", p.name)
                return
            if time.monotonic() >= deadline:
                tail = " | ".join(line.strip() for line in self._log_tail(p, 5).splitlines() if line.strip())
                raise SGLangStartError(
                    f"SGLang {p.name} at {p.url} not healthy before the deadline; command: {' '.join(p.cmd)}; "
                    f"last lines of {self.log_dir / (p.name + '.log')}: {tail or '(empty)'}"
                )
            time.sleep(self.config.health_poll_s)

    @staticmethod
    def _signal(p: _Proc, sig: int) -> None:
        """Signal the process group we created for ``p`` (SGLang's scheduler/detokenizer too).

        Only while the leader is unreaped (alive or a zombie): its pid, hence the group id,
        cannot have been reused by an unrelated process.
        """
        if p.popen is None or p.popen.returncode is not None:
            return
        try:
            os.killpg(p.popen.pid, sig)
        except ProcessLookupError:
            pass

    @staticmethod
    def _exited(p: _Proc) -> bool:
        """Has the leader exited? Checked without reaping it (see ``_signal``)."""
        if p.popen is None or p.popen.returncode is not None:
            return True
        try:
            return os.waitid(os.P_PID, p.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _terminate(self, p: _Proc, grace_s: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL what is left after ``grace_s`` (or once the leader is gone:
        orphaned SGLang workers would keep GPU memory and ports), then reap the leader."""
        if p.popen is None or p.popen.returncode is not None:
            return
        self._signal(p, signal.SIGTERM)
        end = time.monotonic() + grace_s
        while not self._exited(p) and time.monotonic() < end:
            time.sleep(0.05)
        self._signal(p, signal.SIGKILL)
        p.popen.wait()

    def _watch(self) -> None:
        while not self._stop.wait(self.config.watch_interval_s):
            try:
                self.watch_once()
            except Exception as e:  # keep watching; the next round retries
                log.warning("sglang supervisor: %s", e)

    def watch_once(self) -> None:
        """One round: restart dead engines, re-register missing ones, restart a dead router."""
        for e in self.engines:
            if self._stop.is_set():
                return
            if e.failed or e.popen is None:
                continue
            if not self._exited(e):
                # Alive: a hung engine (no /health for hung_after rounds) is killed and then
                # handled like a dead one on the next round.
                if _http_status(e.url + S.HEALTH, timeout=5.0) == 200:
                    e.unhealthy = 0
                else:
                    e.unhealthy += 1
                    if e.unhealthy >= self.config.hung_after:
                        self._event("hung", e.name)
                        self._signal(e, signal.SIGKILL)
                continue
            e.unhealthy = 0
            self._event("died", e.name)
            self._terminate(e)  # reap what is left of its process group
            if e.restarts >= self.config.max_restarts:
                e.failed = True
                self._event("failed", e.name)
                continue
            e.restarts += 1
            self._spawn(e)
            try:
                self._wait_healthy(e, time.monotonic() + self.config.restart_timeout_s)
            except SGLangServerError as err:
                log.warning("sglang supervisor: restart of %s failed: %s", e.name, err)
                self._terminate(e)  # counted as dead: the next round tries again (up to max_restarts)
                continue
            if self.on_restart is not None:
                try:
                    self.on_restart(e.url)
                    self._event("resynced", e.name)
                except Exception as err:  # keep it out of service: kill it, the next round retries
                    log.warning("sglang supervisor: weight re-sync of %s failed: %s", e.name, err)
                    self._terminate(e)
                    continue
            self._event("restarted", e.name)
        if self.router and not self._stop.is_set():
            if self.router.popen is not None and self._exited(self.router):
                self._event("died", "router")
                self._terminate(self.router)
                self.router.cmd = self.router_command()
                self._spawn(self.router)
                self._wait_healthy(self.router, time.monotonic() + self.config.restart_timeout_s)
                self._event("restarted", "router")
            self.sync_router()

    def sync_router(self) -> list[str]:
        """Register every healthy engine the router does not list; returns the urls added."""
        if not self.router:
            return []
        listed = {
            str(w.get("url", "")).rstrip("/") for w in _http_json("GET", self.router.url + S.ROUTER_WORKERS)["workers"]
        }
        added = []
        for e in self.engines:
            if e.url not in listed and _http_status(e.url + S.HEALTH) == 200:
                _http_json("POST", self.router.url + S.ROUTER_WORKERS, {"url": e.url})
                self._event("registered", e.name)
                added.append(e.url)
        return added


__all__ = ["SGLangEngineLost", "SGLangServerConfig", "SGLangServerError", "SGLangSupervisor", "split_passthrough_args"]
