"""``make sglang`` (tools/install_sglang.py) without installing anything: failures and the kernel cache key."""

import subprocess
import sys
from pathlib import Path

from tests.tool_loader import load_tool

TOOL = Path(__file__).resolve().parents[2] / "tools" / "install_sglang.py"


def test_a_failed_step_is_one_line_naming_it_and_its_log(tmp_path):
    out = subprocess.run([sys.executable, str(TOOL), "--venv", str(tmp_path / "v"), "--python", "/bin/false"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("make sglang: error: venv failed (exit 1); log: "), err
    assert "Traceback" not in out.stdout + out.stderr


def test_kernel_cache_key_follows_the_source_and_skips_other_architectures(tmp_path):
    tool = load_tool("install_sglang")
    src = tmp_path / "src"
    for rel in ("cpu/a.cpp", "cpu/model/b.cpp", "cpu/aarch64/c.cpp", "cpu/x.h", "include/y.h"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(rel)
    assert [p.relative_to(src).as_posix() for p in tool.source_files(src)] == ["cpu/a.cpp", "cpu/model/b.cpp"]
    key = tool.source_hash(src, "2.14.1")
    assert key == tool.source_hash(src, "2.14.1") != tool.source_hash(src, "2.15.0")
    (src / "include/y.h").write_text("changed")
    assert tool.source_hash(src, "2.14.1") != key
