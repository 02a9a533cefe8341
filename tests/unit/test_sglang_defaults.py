"""What the trainer gives the SGLang engines it starts (rollout/sglang/defaults.py), checked without a server."""

import os
import subprocess
import sys

from megatron_mtp_rl.models import get_preset
from megatron_mtp_rl.rollout.sglang import defaults


def test_cpu_engines_get_sglangs_cpu_flags_unless_the_user_passed_them():
    flags = defaults.engine_flags(["--mem-fraction-static", "0.2", "--device=cpu"], cpu=True, dtype="float32")
    assert flags[:2] == ["--mem-fraction-static", "0.2"] and flags.count("--mem-fraction-static") == 1
    assert "--device" not in flags  # given as --device=cpu
    for name in ("--attention-backend", "--max-total-tokens", "--skip-server-warmup", "--skip-tokenizer-init"):
        assert flags.count(name) == 1, name
    assert flags[flags.index("--dtype") + 1] == "float32"
    gpu = defaults.engine_flags(["--dtype", "bfloat16"], cpu=False, dtype="float32")
    assert gpu == ["--dtype", "bfloat16", "--skip-tokenizer-init"]  # nothing CPU-only; the user's dtype wins
    assert defaults.engine_on_cpu(["--device", "cpu"]) and not defaults.engine_on_cpu(["--device=cuda"])


def test_remote_code_only_where_the_export_ships_its_config_class():
    assert defaults.exports_remote_code(get_preset("tiny-dense"), None)  # MiMo: configuration_mimo.py + auto_map
    assert not defaults.exports_remote_code(get_preset("tiny-moe"), None)  # GLM-4.5: SGLang has the class
    assert "--trust-remote-code" in defaults.engine_flags([], cpu=False, remote_code=True)


def test_cpu_environment_keeps_sglang_off_its_amx_paths(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    env = defaults.engine_env(cpu=True)
    assert env["SGLANG_USE_CPU_ENGINE"] == "1"
    assert env["PYTHONPATH"] == os.pathsep.join([str(defaults.CPU_SITE), "/somewhere"])
    assert defaults.engine_env(cpu=False) == {}
    # The sitecustomize there makes torch report no AMX tiles (in a fresh interpreter, as an engine's).
    code = "import torch; print(torch.cpu._is_amx_tile_supported())"
    for amx, expect in (("0", "False"), ("1", None)):
        run_env = {**os.environ, "PYTHONPATH": env["PYTHONPATH"], "MTP_RL_SGLANG_CPU_AMX": amx}
        out = subprocess.run([sys.executable, "-c", code], env=run_env, capture_output=True, text=True, check=True)
        if expect:
            assert out.stdout.strip() == expect
        else:  # MTP_RL_SGLANG_CPU_AMX=1: torch's own answer
            import torch

            assert out.stdout.strip() == str(torch.cpu._is_amx_tile_supported())
