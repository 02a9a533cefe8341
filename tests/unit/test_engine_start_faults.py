"""An engine that cannot start ends the run in one line (command, exit code, last lines of its log),
exit code ≠ 0, no traceback; SGLang missing and a port in use are caught before the model export."""

import socket
import sys

import pytest

from megatron_mtp_rl.cli import main
from megatron_mtp_rl.errors import EngineStartError
from megatron_mtp_rl.rollout.sglang.preflight import check_command, check_ports_free
from tests.dist_utils import free_port
from tests.e2e.test_train import FAST


def test_a_server_command_that_exits_is_one_line(tmp_path, capsys):
    port = free_port(span=1)
    rc = main(["train", *FAST, "--num-steps", "1", "--rollout-engine", "sglang", "--rollout-server-cmd", "/bin/false",
               "--rollout-base-port", str(port), "--rollout-hf-dir", str(tmp_path / "hf"),
               "--rollout-startup-timeout", "60"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("error: SGLang engine0 exited with code 1 before answering /health; command: /bin/false")
    assert f"--port {port}" in err[-1] and "last lines of" in err[-1]
    assert not (tmp_path / "hf" / "sync").exists()  # nothing pushed, nothing trained


def test_missing_sglang_and_bad_commands_are_refused_before_start():
    with pytest.raises(EngineStartError, match=r"the package 'no_such_sglang' is not installed in .*python"):
        check_command([sys.executable, "-m", "no_such_sglang.launch_server"], "--rollout-server-cmd")
    with pytest.raises(EngineStartError, match="--rollout-server-cmd /no/such/python -m x: /no/such/python not found"):
        check_command(["/no/such/python", "-m", "x"], "--rollout-server-cmd")
    check_command([sys.executable, "-m", "pytest"], "--rollout-server-cmd")  # installed: passes


def test_a_port_in_use_is_refused_before_start():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(EngineStartError, match=f"port {port} on 127.0.0.1 \\(engine1\\) is in use"):
            check_ports_free("127.0.0.1", [(free_port(), "engine0"), (port, "engine1")])


def test_a_port_left_in_time_wait_is_free():
    """A stopped server (uvicorn and the router set SO_REUSEADDR) leaves its closed connections in
    TIME_WAIT: a re-run must not be refused."""
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        cli = socket.create_connection(("127.0.0.1", port))
        conn, _ = srv.accept()
        conn.close()  # the server side closes first: its end goes to TIME_WAIT
        cli.recv(1)
        cli.close()
    with socket.socket() as probe:  # a plain bind (no SO_REUSEADDR) is refused: the TIME_WAIT is there
        with pytest.raises(OSError):
            probe.bind(("127.0.0.1", port))
    check_ports_free("127.0.0.1", [(port, "engine0")])
