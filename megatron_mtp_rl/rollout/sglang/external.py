"""SGLang servers someone else started (``--rollout-engine-urls URL,...``): we start and stop nothing.

A cluster's own launcher may run the engines (and a router). Given one URL that answers the
router's ``GET /workers``, generation goes through it and weight updates to the engines it lists
(the router does not proxy them); given engine URLs, generation is split over them. Every engine
must answer /health at start-up, and again before each rollout: a gone engine ends the run in
one line (we cannot restart what we did not start).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

from megatron_mtp_rl.errors import EngineStartError
from megatron_mtp_rl.rollout.sglang import schema as S
from megatron_mtp_rl.rollout.sglang.server import SGLangServerError


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return 0, b""


def parse_urls(spec: str) -> list[str]:
    """``URL,URL,...`` → URLs without trailing slashes."""
    return [u.strip().rstrip("/") for u in spec.split(",") if u.strip()]


def router_workers(url: str) -> list[str] | None:
    """The engines a router at ``url`` lists; None when ``url`` is not a router."""
    status, body = _get(url + S.ROUTER_WORKERS)
    if status != 200:
        return None
    try:
        workers = json.loads(body).get("workers")
    except (ValueError, AttributeError):
        return None
    if not isinstance(workers, list):
        return None
    return [str(w.get("url", "")).rstrip("/") for w in workers if w.get("url")]


class ExternalEngines:
    """Stands where ``SGLangSupervisor`` stands for engines we launched: health checks, nothing to stop."""

    def __init__(self, urls: list[str], *, startup_timeout_s: float = 60.0, poll_s: float = 0.5):
        if not urls:
            raise EngineStartError("--rollout-engine-urls names no URL")
        self.startup_timeout_s = startup_timeout_s
        self.poll_s = poll_s
        self.on_restart = None  # the supervisor's hook; external engines are never restarted by us
        workers = router_workers(urls[0]) if len(urls) == 1 else None
        self.router_url = urls[0] if workers else None
        self.engine_urls = workers or urls

    @property
    def generate_url(self) -> str | None:
        """The router, or None: generation is split over the engines."""
        return self.router_url

    def start(self) -> ExternalEngines:
        """Wait until every engine (and the router) answers /health."""
        deadline = time.monotonic() + self.startup_timeout_s
        for url in ([self.router_url] if self.router_url else []) + self.engine_urls:
            while _get(url + S.HEALTH)[0] != 200:
                if time.monotonic() >= deadline:
                    raise EngineStartError(
                        f"--rollout-engine-urls: {url} does not answer {S.HEALTH} after {self.startup_timeout_s:g}s"
                    )
                time.sleep(self.poll_s)
        return self

    def check(self) -> None:
        """Before each rollout: every engine still answers /health."""
        gone = [u for u in self.engine_urls if _get(u + S.HEALTH, timeout=30.0)[0] != 200]
        if gone:
            raise SGLangServerError(f"external SGLang engine(s) {gone} do not answer {S.HEALTH} (started elsewhere)")

    def close(self) -> None:
        """We started nothing, so we stop nothing."""
