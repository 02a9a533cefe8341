"""The real SGLang 0.5.23 in the test suite: ONE engine per pytest session, reused by every test.

``make sglang`` installs SGLang in its own venv (``MTP_RL_SGLANG_VENV``, default
``~/.cache/megatron-mtp-rl/sglang-0.5.23``) with CPU kernels where there is no CUDA; ``make test``
depends on it. The engine runs there with the flags and environment the trainer gives engines it starts
(``megatron_mtp_rl/rollout/sglang/defaults.py``: on CPU ``SGLANG_USE_CPU_ENGINE=1``, ``--device cpu``,
torch-native attention, a small KV pool, no warm-up, ``--skip-tokenizer-init``) plus ``--dtype float32``
(log-probs compared with the trainer's at 1e-4), on 127.0.0.1 and a free port.

Usage: mark the test ``sglang`` and take the ``real_sglang`` fixture (a :class:`RealSGLang`)::

    @pytest.mark.sglang
    def test_something(real_sglang, tmp_path):
        model_dir = export_family(tmp_path, "mimo")[0]      # or any HF directory SGLang can serve
        real_sglang.serve(model_dir, weight_version="7")    # same config.json as now: a reload
        ans = real_sglang.generate([1, 2, 3], max_new_tokens=4)
        lps = real_sglang.prompt_logprobs([1, 2, 3, 4])     # log p(x_t | x_<t), t = 1..

* :meth:`RealSGLang.serve` loads a model. When the engine already serves a model whose
  ``config.json`` is the same, the new weights come through ``/update_weights_from_disk`` (seconds);
  otherwise (another architecture or size, extra flags, or no engine yet) the engine is restarted on it
  (about a minute on 2 cores). Group tests by model to keep restarts few.
* A test may kill the engine (``real_sglang.kill()``, or a request that tears it down): the next
  test that takes the fixture gets a fresh engine on the same model (a restart happens only then).
* ``url``, ``post(route, body)``, ``get(route)`` reach the engine directly; ``log_path`` is its log
  (``log_tail()`` for assertion messages). Stopped at the end of the session.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from megatron_mtp_rl.rollout.sglang import defaults
from megatron_mtp_rl.rollout.sglang.server import DEFAULT_ENGINE_ENV

START_TIMEOUT_S = 600.0
TEST_FLAGS = ["--dtype", "float32", "--max-running-requests", "16"]


def sglang_missing() -> str | None:
    """Why the real engine cannot run here (None: it can)."""
    py = defaults.sglang_venv() / "bin" / "python"
    if not py.exists():
        return f"no SGLang venv at {defaults.sglang_venv()}: run `make sglang`"
    record = defaults.sglang_venv() / "mtp-rl-sglang.json"
    if not record.exists():
        return f"{record} missing: run `make sglang` (it records what it installed)"
    return None


class RealSGLang:
    """One real SGLang engine process (see the module docstring)."""

    def __init__(self, log_dir: Path):
        from tests.dist_utils import free_port

        self.log_dir = Path(log_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_path: str | None = None
        self.extra_flags: list[str] = []
        self.config: dict | None = None
        self.popen: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = self.log_dir / "engine.log"
        self._log = None

    # -- process ------------------------------------------------------------------------------
    def command(self, model_path: str, extra_flags: Sequence[str] = ()) -> tuple[list[str], dict]:
        cpu = defaults.engine_on_cpu(list(extra_flags))
        remote = "auto_map" in json.loads((Path(model_path) / "config.json").read_text())
        flags = defaults.engine_flags([*TEST_FLAGS, *extra_flags], cpu=cpu, remote_code=remote)
        cmd = [*defaults.default_server_cmd(), "--model-path", str(model_path), "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), *flags]
        env = {**DEFAULT_ENGINE_ENV, **os.environ, **defaults.engine_env(cpu=cpu)}  # as the supervisor merges
        return cmd, env

    def start(self, model_path: str | os.PathLike, extra_flags: Sequence[str] = ()) -> None:
        """(Re)start the engine on ``model_path``; returns once /health answers."""
        self.stop()
        self.model_path, self.extra_flags = str(model_path), list(extra_flags)
        self.config = json.loads((Path(model_path) / "config.json").read_text())
        cmd, env = self.command(self.model_path, self.extra_flags)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== start {self.starts}: {' '.join(cmd)}\n".encode())
        self._log.flush()
        guarded = [sys.executable, "-m", "megatron_mtp_rl.rollout.die_with_parent", str(os.getpid()), *cmd]
        self.popen = subprocess.Popen(guarded, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                      start_new_session=True)  # fmt: skip
        self.starts += 1
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.popen.poll() is not None:
                raise RuntimeError(f"SGLang exited with {self.popen.returncode} while starting:\n{self.log_tail()}")
            if self._status("/health") == 200:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"SGLang not healthy after {START_TIMEOUT_S:.0f}s:\n{self.log_tail()}")
            time.sleep(0.5)

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None and self._status("/health", 10.0) == 200

    def kill(self) -> None:
        """SIGKILL the engine's process group (a test that wants it dead)."""
        if self.popen is not None and self.popen.poll() is None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait()

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after 10 s."""
        p = self.popen
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        if p is not None:
            try:
                os.killpg(p.pid, signal.SIGKILL)  # SGLang's scheduler / detokenizer, whatever is left
            except (ProcessLookupError, PermissionError):
                pass
            p.wait()
        self.popen = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def ensure_alive(self) -> None:
        """Restart on the model it served when a previous test killed it."""
        if self.model_path is not None and not self.alive():
            self.start(self.model_path, self.extra_flags)

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    # -- models -------------------------------------------------------------------------------
    def serve(
        self, model_path: str | os.PathLike, *, weight_version: str | None = None, extra_flags: Sequence[str] = ()
    ) -> str:
        """Serve ``model_path``: "reloaded" (``/update_weights_from_disk``) or "started" (a restart)."""
        config = json.loads((Path(model_path) / "config.json").read_text())
        if self.alive() and config == self.config and list(extra_flags) == self.extra_flags:
            body = {"model_path": str(model_path), "flush_cache": True, "abort_all_requests": True}
            if weight_version is not None:
                body["weight_version"] = str(weight_version)
            ans = self.post("/update_weights_from_disk", body, timeout=300)
            if not ans.get("success"):
                raise RuntimeError(f"/update_weights_from_disk failed: {ans}\n{self.log_tail()}")
            self.model_path = str(model_path)
            return "reloaded"
        self.start(model_path, extra_flags)
        if weight_version is not None:
            self.post("/update_weight_version", {"new_version": str(weight_version)})
        return "started"

    # -- HTTP ---------------------------------------------------------------------------------
    def _status(self, route: str, timeout: float = 2.0) -> int:
        try:
            with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def post(self, route: str, body: dict | None = None, timeout: float = 120.0):
        req = urllib.request.Request(self.url + route, data=json.dumps(body or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()

    def get(self, route: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + route, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()

    def generate(self, input_ids: Sequence[int], *, max_new_tokens: int = 8, temperature: float = 0.0,
                 **extra) -> dict:  # fmt: skip
        """One /generate with token ids (greedy by default), output log-probs included."""
        sp = {"max_new_tokens": max_new_tokens, "temperature": temperature, "ignore_eos": True}
        body = {"input_ids": [int(t) for t in input_ids], "sampling_params": sp, "return_logprob": True, **extra}
        return self.post("/generate", body)

    def prompt_logprobs(self, input_ids: Sequence[int]) -> list[float]:
        """SGLang's log p(x_t | x_<t) for t = 1 .. len-1 (the prompt's own tokens, as a trainer scores them)."""
        ans = self.generate(input_ids, max_new_tokens=1, logprob_start_len=0)
        entries = ans["meta_info"]["input_token_logprobs"]
        assert entries[0][0] is None and len(entries) == len(input_ids), entries[:3]
        return [float(e[0]) for e in entries[1:]]


def export_family(tmp_path: Path, family: str, *, seed: int = 3, sharp: float = 8.0):
    """Our export (the rollout path's ``export_hf``) of a tiny RANDOM model of ``family``.

    Returns ``(dir, model, model_args)``. ``sharp`` scales the final norm so next-token distributions
    are peaked (greedy choices are then decided by clear margins, and log-probs are far from uniform).
    Needs parallel_state (the ``single_process`` fixture).
    """
    import torch

    from megatron_mtp_rl import platform
    from megatron_mtp_rl.cluster.weight_sync import export_hf
    from megatron_mtp_rl.models import build_model, get_preset

    preset, overrides = FAMILY_MODELS[family]
    margs = get_preset(preset).with_overrides(vocab_size=100, **overrides)
    platform.seed_everything(seed)
    model = build_model(margs, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("decoder.final_layernorm.weight"):
                p.mul_(sharp)
    return export_hf(model, margs, tmp_path / family, family), model, margs


# The families SGLang serves on CPU, as our models (the cases of tests/unit/test_families_sglang_export.py).
# DeepSeek-V3 (MLA) is GPU-only on both sides: megatron's MLA needs CUDA, SGLang's MLA backends too.
FAMILY_MODELS: dict[str, tuple[str, dict]] = {
    "mimo": ("tiny-dense", {}),
    "qwen3": ("tiny-dense", dict(qk_layernorm=True, kv_channels=32, mtp_num_layers=1)),
    "qwen3_moe": ("tiny-moe", dict(qk_layernorm=True, kv_channels=32, moe_router_score_function="softmax")),
    "glm4_moe": ("tiny-moe", {}),
}


def session_fixture(tmp_path_factory):
    """Body of the session-scoped ``real_sglang_server`` fixture (tests/conftest.py): not started until
    a test serves a model; stopped at the session's end."""
    import pytest

    why = sglang_missing()
    if why:
        pytest.fail(f"the real SGLang engine cannot run: {why}", pytrace=False)
    server = RealSGLang(tmp_path_factory.mktemp("real-sglang"))
    try:
        yield server
    finally:
        server.stop()
