"""Checks before a rollout engine is started: its command runs, SGLang is importable there, its ports are free.

They run before the model is exported for the engines, so a missing SGLang or a port in use ends
the run in one line (``EngineStartError``) instead of after minutes of start-up; what only the
start itself shows (a command that exits, too little GPU memory) is reported by the supervisor
in the same one-line form.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path

from megatron_mtp_rl.errors import EngineStartError

_FIND_SPEC = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec(sys.argv[1]) else 3)"


def check_command(cmd: Sequence[str], flag: str) -> None:
    """The executable exists; for ``PYTHON -m pkg.module`` the package is installed in that interpreter."""
    if not cmd:
        raise EngineStartError(f"{flag} is empty")
    exe = cmd[0]
    if shutil.which(exe) is None and not Path(exe).is_file():
        raise EngineStartError(f"{flag} {' '.join(cmd)}: {exe} not found")
    if len(cmd) >= 3 and cmd[1] == "-m":
        package = cmd[2].split(".")[0]
        try:
            rc = subprocess.run([exe, "-c", _FIND_SPEC, package], capture_output=True, timeout=120).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            raise EngineStartError(f"{flag} {' '.join(cmd)}: cannot run {exe} ({e})") from None
        if rc == 3:
            raise EngineStartError(
                f"{flag} {' '.join(cmd)}: the package {package!r} is not installed in {exe} "
                f"(install it there, or point {flag} at an interpreter that has it)"
            )


def check_ports_free(host: str, ports: Sequence[tuple[int, str]]) -> None:
    """Every ``(port, what)`` can be bound on ``host`` now (nothing else listens there).

    The probe binds with ``SO_REUSEADDR``, as SGLang's server and the router do: connections a
    stopped server left in TIME_WAIT do not keep a re-run from starting; a listening socket does.
    """
    for port, what in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                raise EngineStartError(f"port {port} on {host} ({what}) is in use: {e.strerror}") from None


def preflight(server_cmd: Sequence[str], router_cmd: Sequence[str] | None, host: str, ports) -> None:
    """All of the above for the engines (and the router when one is started)."""
    check_command(server_cmd, "--rollout-server-cmd")
    if router_cmd is not None:
        check_command(router_cmd, "--rollout-router-cmd")
    check_ports_free(host, ports)
