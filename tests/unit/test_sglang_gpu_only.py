"""GPU-only SGLang requests are refused in one line where an engine serves on CPU, before it is asked;
a request that kills an engine ends the run in one line naming the engine and its log (fake engine,
which behaves as SGLang 0.5.23 measured on CPU: ``/release_memory_occupation`` tears it down)."""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

import pytest

from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
from megatron_mtp_rl.rollout.sglang.gpu_only import GPUOnlyError, engine_flag_problems
from megatron_mtp_rl.rollout.sglang.server import SGLangEngineLost, SGLangServerConfig
from tests.fake_sglang_server import FakeServer

FAKE = str(Path(__file__).resolve().parents[1] / "fake_sglang_server.py")


class _CudaTensor:
    is_cuda = True


def _routes(url: str) -> list[str]:
    with urllib.request.urlopen(url + "/_fake/state", timeout=5) as r:
        return [e["route"] for e in json.loads(r.read())["log"]]


def test_gpu_only_requests_are_refused_on_a_cpu_engine_and_sent_to_a_gpu_one():
    with FakeServer(device="cpu") as cpu, FakeServer() as gpu:
        with SGLangEngine(cpu.url) as eng:
            for call in (eng.release_memory, eng.resume_memory):
                with pytest.raises(GPUOnlyError, match=f"GPU-only .* {cpu.url} run on CPU") as e:
                    call()
                assert "\n" not in str(e.value)
            with pytest.raises(GPUOnlyError, match="CUDA-IPC"):  # a GPU trainer's bucket (only is_cuda is read)
                eng.push_bucket([("w", _CudaTensor())], "1")
        assert not any("memory_occupation" in r for r in _routes(cpu.url))  # the engine was never asked
        with SGLangEngine(gpu.url) as eng:
            eng.release_memory()
            eng.resume_memory()
        assert [r for r in _routes(gpu.url) if "memory_occupation" in r] == [
            "/release_memory_occupation",
            "/resume_memory_occupation",
        ]


def test_speculative_decoding_on_cpu_engines_is_a_config_error():
    from megatron_mtp_rl.config import check, parse_config
    from megatron_mtp_rl.errors import ConfigError

    spec = ["--sglang-speculative-algorithm", "EAGLE"]
    cfg = parse_config(["--rollout-engine", "sglang", *spec])
    with pytest.raises(ConfigError, match="speculative-algorithm EAGLE: SGLang's speculative decoding is GPU-only"):
        check(cfg, 1, cuda=False)
    check(cfg, 1, cuda=True)  # a GPU machine: allowed
    assert engine_flag_problems(["--speculative-algorithm=NGRAM", "--device", "cpu"], cuda=True)
    assert engine_flag_problems(["--speculative-algorithm", "NGRAM"], cuda=None) == []  # device not known yet


def test_a_request_that_kills_the_engine_ends_in_one_line_naming_it_and_its_log(tmp_path):
    from tests.dist_utils import free_port

    cfg = SGLangServerConfig(
        model_path="fake-model",
        port=free_port(),
        engine_flags=["--device", "cpu"],
        server_cmd=[sys.executable, FAKE],
        startup_timeout_s=30,
        health_poll_s=0.05,
        watch_interval_s=0.1,
        max_restarts=0,
        log_dir=str(tmp_path),
    )
    with SGLangEngine.launch(cfg, control_timeout_s=10) as eng:
        url = eng.engine_urls[0]
        req = urllib.request.Request(
            url + "/release_memory_occupation", data=b"{}", method="POST", headers={"Content-Type": "application/json"}
        )
        with pytest.raises(OSError):  # sent behind our back: the CPU engine goes down with it
            urllib.request.urlopen(req, timeout=10)
        with pytest.raises(SGLangEngineLost) as e:
            eng.open_update_frame()
    msg = str(e.value)
    assert "\n" not in msg and f"engine0 at {url}" in msg and str(tmp_path / "engine0.log") in msg
    assert "Found no NVIDIA driver" in msg  # the log's last line says why


def test_the_cli_ends_a_run_whose_engines_went_away_in_one_line(capsys):
    from megatron_mtp_rl import cli

    def job(cfg):
        raise SGLangEngineLost("SGLang engine(s) went away during a control request: engine0 at http://h:1, log /l")

    assert cli._run(job, None) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: SGLang engine(s) went away during a control request: engine0 at http://h:1, log /l"
