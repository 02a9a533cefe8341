"""What SGLang 0.5.23 does only on GPUs, refused in one line where an engine runs on CPU, before it is asked.

Measured with the real server on CPU: ``/release_memory_occupation`` (and so the colocated hand-off)
kills the whole server (``Found no NVIDIA driver``), EAGLE/NEXTN speculative decoding refuses to start
with the torch-native attention backend and NGRAM kills the server at its first request. CUDA-IPC
tensor handles and NCCL update groups need a GPU on both ends (CPU engines get ``file_system`` shared
memory and gloo groups instead). An engine's device is what its own ``/server_info`` says, so an
external engine is judged as it runs, not as this machine looks.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_mtp_rl.errors import ConfigError

SPECULATIVE_FLAG = "--speculative-algorithm"


class GPUOnlyError(ConfigError):
    """A GPU-only SGLang feature asked of an engine that runs on CPU (one line, the engine not asked)."""


def refuse(what: str, urls: Sequence[str]) -> None:
    """Raise :class:`GPUOnlyError`: ``what`` cannot run on the CPU engines ``urls``."""
    raise GPUOnlyError(
        f"{what} is GPU-only in SGLang 0.5.23 and SGLang engine(s) {', '.join(urls)} run on CPU "
        "(it would kill the server): not sent"
    )


def flag_value(flags: Sequence[str], name: str) -> str | None:
    """The value of ``name`` in an engine command line (``--x v`` or ``--x=v``), or None."""
    for i, f in enumerate(flags):
        if f.startswith(name + "="):
            return f.split("=", 1)[1]
        if f == name and i + 1 < len(flags):
            return flags[i + 1]
    return None


def engine_flag_problems(flags: Sequence[str], *, cuda: bool | None) -> list[str]:
    """GPU-only SGLang flags asked of engines this machine will start on CPU (config time, one line each).

    The engines run on CPU when ``--sglang-device cpu`` is given, or without it when this machine has no
    CUDA (``cuda`` False; None: not known yet, nothing is refused).
    """
    device = flag_value(flags, "--device")
    if not (device == "cpu" or (device is None and cuda is False)):
        return []
    algo = flag_value(flags, SPECULATIVE_FLAG)
    if algo:
        return [
            f"--sglang-speculative-algorithm {algo}: SGLang's speculative decoding is GPU-only in 0.5.23 and the "
            "engines run on CPU (EAGLE/NEXTN refuse the torch-native attention backend, NGRAM kills the server)"
        ]
    return []


__all__ = ["GPUOnlyError", "engine_flag_problems", "flag_value", "refuse"]
