"""What a started SGLang engine gets unless the user says otherwise: SGLang's venv, and on CPU its CPU setup.

SGLang lives in its own venv (``make sglang``; default ``~/.cache/megatron-mtp-rl/sglang-0.5.23``,
``MTP_RL_SGLANG_VENV`` overrides), as in the Docker image; its python runs the engines and the router
when ``--rollout-server-cmd`` / ``--rollout-router-cmd`` are not given (else the trainer's own python,
for an image where both live in one environment).

On a machine without CUDA SGLang needs ``SGLANG_USE_CPU_ENGINE=1`` (else it imports vllm), ``--device
cpu``, the torch-native attention backend and a small KV pool (its default sizes the pool from GPU
memory); the server warm-up is skipped (it only times a request); SGLang's AMX kernel paths are
kept off (``cpu_site/sitecustomize.py``). Every engine gets
``--skip-tokenizer-init``: the bridge sends and reads token ids, so SGLang never needs to build our
tokenizer (the arith / byte tokenizers are not HF ones). An export that ships its config class
(``auto_map``: MiMo's, as its release does; SGLang 0.5.23 has no ``mimo`` config) gets
``--trust-remote-code``. A flag the user passed (``--sglang-X``) wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

SGLANG_VENV_ENV = "MTP_RL_SGLANG_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "megatron-mtp-rl" / "sglang-0.5.23"

# flag -> value (None: a switch); added in this order when the user did not pass the flag
CPU_ENGINE_FLAGS: dict[str, str | None] = {
    "--device": "cpu",
    "--attention-backend": "torch_native",
    # Only a start-up check on CPU (the pool is --max-total-tokens): "memory the load may use" is
    # (1 - this) x the free RAM; lower, other processes' allocations during the load fail the start.
    "--mem-fraction-static": "0.5",
    "--max-total-tokens": "8192",
    "--skip-server-warmup": None,
    # SGLang maps a CPU engine's gpu id to a NUMA node to bind its threads: engine i's default
    # --base-gpu-id i would ask for node i, which a one-node machine lacks (the engine dies).
    "--base-gpu-id": "0",
    # An idle scheduler otherwise busy-polls (half a core measured): the trainer shares the CPUs.
    "--sleep-on-idle": None,
}
# TORCHDYNAMO_DISABLE: SGLang torch.compile's a few helpers (rotary, sampling, top-k); on CPU inductor
# then compiles C++ during the first requests (minutes on 2 cores). Eager is also what the trainer computes.
CPU_ENGINE_ENV = {"SGLANG_USE_CPU_ENGINE": "1", "TORCHDYNAMO_DISABLE": "1"}
CPU_SITE = Path(__file__).resolve().parent / "cpu_site"


def sglang_venv() -> Path:
    return Path(os.environ.get(SGLANG_VENV_ENV) or DEFAULT_VENV).expanduser()


def sglang_python() -> str:
    """SGLang's venv's python when ``make sglang`` made it, else this interpreter."""
    py = sglang_venv() / "bin" / "python"
    return str(py) if py.exists() else sys.executable


def default_server_cmd() -> list[str]:
    return [sglang_python(), "-m", "sglang.launch_server"]


def default_router_cmd() -> list[str]:
    return [sglang_python(), "-m", "sglang_router.launch_router"]


def _given(flags: Sequence[str], name: str) -> bool:
    return any(f == name or f.startswith(name + "=") for f in flags)


def engine_flags(flags: Sequence[str], *, cpu: bool, remote_code: bool = False, dtype: str | None = None) -> list[str]:
    """The user's engine flags plus the defaults they did not pass (CPU ones only when ``cpu``;
    ``--trust-remote-code`` when the export ships its config class, as MiMo's does; ``--dtype``:
    the trainer's precision, since SGLang's ``auto`` serves a float32 checkpoint in float16)."""
    out = list(flags)
    if dtype and not _given(out, "--dtype"):
        out += ["--dtype", dtype]
    if remote_code and not _given(out, "--trust-remote-code"):
        out.append("--trust-remote-code")
    if not _given(out, "--skip-tokenizer-init") and not _given(out, "--tokenizer-path"):
        out.append("--skip-tokenizer-init")
    if cpu:
        for name, value in CPU_ENGINE_FLAGS.items():
            if not _given(out, name):
                out += [name] if value is None else [name, value]
    return out


def engine_env(*, cpu: bool) -> dict[str, str]:
    """Environment for the engines, applied over the user's (whose own values of these keys win).

    On CPU, ``cpu_site/`` leads ``PYTHONPATH``: its ``sitecustomize`` keeps SGLang off its Intel AMX
    kernel paths (bf16-only, and partly missing from the CPU kernels we build; see that file).
    """
    if not cpu:
        return {}
    env = {k: v for k, v in CPU_ENGINE_ENV.items() if k not in os.environ}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CPU_SITE), os.environ.get("PYTHONPATH")) if p)
    return env


def exports_remote_code(model_args, flavour: str | None) -> bool:
    """The HF export of this model ships its own config class (``auto_map``): SGLang must trust it."""
    from megatron_mtp_rl.hf.families import family_for

    return "auto_map" in family_for(model_args, flavour).hf_config(model_args, 0)


def engine_on_cpu(flags: Sequence[str]) -> bool:
    """The engines run on CPU: the user said ``--sglang-device cpu``, or this machine has no CUDA device."""
    for i, f in enumerate(flags):
        if f.startswith("--device="):
            return f.split("=", 1)[1] == "cpu"
        if f == "--device" and i + 1 < len(flags):
            return flags[i + 1] == "cpu"
    import torch

    return not torch.cuda.is_available()


__all__ = [
    "CPU_ENGINE_ENV",
    "CPU_ENGINE_FLAGS",
    "default_router_cmd",
    "default_server_cmd",
    "engine_env",
    "engine_flags",
    "engine_on_cpu",
    "exports_remote_code",
    "sglang_python",
    "sglang_venv",
]
