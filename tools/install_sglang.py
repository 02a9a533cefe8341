"""``make sglang``: SGLang 0.5.23 + sglang-router in their own venv, with CPU kernels where there is no CUDA.

Stdlib only (runs with any Python 3.12, before the trainer's venv exists). Steps, one line each:

1. ``venv``    SGLang's venv (default ``~/.cache/megatron-mtp-rl/sglang-0.5.23``, outside the clone so fresh
               clones reuse it; ``--venv`` / ``MTP_RL_SGLANG_VENV``). Never the trainer's venv: SGLang pins
               its own torch and transformers, as its Docker image does.
2. ``pip``     ``sglang==0.5.23 sglang-router`` (skipped when both are installed).
3. On a machine without CUDA (no NVIDIA driver), SGLang's CPU operator library, which PyPI does not ship:
   ``toolchain`` apt's g++ / libnuma-dev when missing; ``kernels`` built from ``../shared/sglang-cpu/src``
   (``--kernel-src`` / ``MTP_RL_SGLANG_CPU_SRC``) with ``torch.utils.cpp_extension`` into a cache keyed by
   the source's hash (``~/.cache/megatron-mtp-rl/sglang-cpu-kernels/<hash>/``); ``install`` copies it into
   the venv's ``sgl_kernel`` package, where its loader falls back to it when the CUDA build cannot load.

What was installed is recorded in ``<venv>/mtp-rl-sglang.json``; a second run checks it and the files and
returns in seconds. A failed step prints one line naming it and its log, and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SGLANG_VERSION = "0.5.23"
PACKAGES = [f"sglang=={SGLANG_VERSION}", "sglang-router"]
ROOT = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "megatron-mtp-rl"
DEFAULT_VENV = CACHE / f"sglang-{SGLANG_VERSION}"
RECORD = "mtp-rl-sglang.json"
# SGLang's CPU kernels assume AVX-512 (x86-64-v4) with bf16/VNNI; the AMX flags only enable code paths.
CFLAGS = ["-O3", "-march=x86-64-v4", "-mavx512bf16", "-mavx512vnni", "-mamx-tile", "-mamx-bf16", "-mamx-int8",
          "-fopenmp", "-DNDEBUG"]  # fmt: skip
SKIP_DIRS = {"aarch64", "ppc64", "riscv64", "benchmark"}  # other architectures' kernels, benchmarks

# Runs inside SGLang's venv (its torch): compile the sources into common_ops.<abi>.so in OUT.
BUILD_SCRIPT = r"""
import json, os, sys, sysconfig
from pathlib import Path
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension
spec = json.loads(Path(sys.argv[1]).read_text())
os.chdir(spec["build"])
sys.argv = [sys.argv[0], "build_ext", "--build-lib", spec["out"], "--build-temp", spec["build"] + "/tmp"]
ext = CppExtension("common_ops", spec["sources"], include_dirs=spec["include"],
                   extra_compile_args=spec["cflags"], libraries=["numa", "gomp"], extra_link_args=["-s"])
setup(name="sgl-kernel-cpu", ext_modules=[ext], cmdclass={"build_ext": BuildExtension})
"""


class StepFailed(Exception):
    pass


def say(msg: str) -> None:
    print(f"make sglang: {msg}", flush=True)


def run_logged(cmd: list[str], log: Path, step: str, env: dict | None = None) -> None:
    """Run ``cmd`` with its output in ``log``; a non-zero exit is a failed ``step``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        raise StepFailed(f"{step} failed (exit {rc}); log: {log}")


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def installed_versions(py: Path) -> dict[str, str | None]:
    code = (
        "import importlib.metadata as m, json\n"
        "def v(n):\n"
        "    try: return m.version(n)\n"
        "    except m.PackageNotFoundError: return None\n"
        "print(json.dumps({n: v(n) for n in ('sglang', 'sglang-router', 'torch')}))"
    )
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def has_cuda() -> bool:
    """An NVIDIA driver is present: SGLang's stock CUDA kernels are what it runs with."""
    forced = os.environ.get("MTP_RL_SGLANG_CPU_KERNELS")
    if forced in ("0", "1"):
        return forced == "0"
    return Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi") is not None


def default_source() -> Path:
    """``../shared/sglang-cpu/src`` next to this clone, or next to the main checkout of a git worktree."""
    roots = [ROOT]
    git = ROOT / ".git"
    if git.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        gitdir = Path(git.read_text().split("gitdir:", 1)[-1].strip())
        roots.append(gitdir.parents[2] if gitdir.parent.name == "worktrees" else gitdir)
    candidates = [r.parent / "shared" / "sglang-cpu" / "src" for r in roots]
    return next((c for c in candidates if c.is_dir()), candidates[0])


def source_files(src: Path) -> list[Path]:
    """Every ``cpu/**/*.cpp`` but the other architectures' kernels and the benchmarks."""
    cpu = src / "cpu"
    return [p for p in sorted(cpu.rglob("*.cpp")) if not SKIP_DIRS & set(p.relative_to(cpu).parts)]


def source_hash(src: Path, torch_version: str) -> str:
    """Every file under ``src`` (names and bytes), the flags and SGLang's torch: a change rebuilds."""
    h = hashlib.sha256()
    for p in sorted(q for q in src.rglob("*") if q.is_file()):
        h.update(str(p.relative_to(src)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(" ".join(CFLAGS).encode() + torch_version.encode())
    return h.hexdigest()[:16]


def ensure_toolchain(log: Path) -> str:
    missing = []
    if shutil.which("g++") is None:
        missing.append("g++")
    if not Path("/usr/include/numa.h").exists():
        missing.append("libnuma-dev")
    if not missing:
        return "g++ and libnuma-dev present"
    if shutil.which("apt-get") is None:
        raise StepFailed(f"toolchain failed: {', '.join(missing)} missing and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    try:
        run_logged([*sudo, "apt-get", "install", "-y", "-q", *missing], log, "toolchain (apt-get install)", env)
    except StepFailed:  # a fresh machine's package lists may be empty or stale
        run_logged([*sudo, "apt-get", "update", "-q"], log, "toolchain (apt-get update)", env)
        run_logged([*sudo, "apt-get", "install", "-y", "-q", *missing], log, "toolchain (apt-get install)", env)
    return f"installed {', '.join(missing)} with apt-get"


def build_kernels(py: Path, src: Path, cache_dir: Path, log: Path) -> Path:
    """``cache_dir/common_ops.<abi>.so`` (built unless already there)."""
    found = sorted(cache_dir.glob("common_ops*.so"))
    if found:
        return found[0]
    if not (src / "cpu" / "torch_extension_cpu.cpp").is_file():
        raise StepFailed(f"kernels failed: no SGLang CPU kernel source at {src} (set MTP_RL_SGLANG_CPU_SRC)")
    build = cache_dir.with_name(cache_dir.name + ".build")
    shutil.rmtree(build, ignore_errors=True)
    build.mkdir(parents=True)
    spec = {
        "build": str(build),
        "out": str(build / "out"),
        "sources": [str(p) for p in source_files(src)],
        "include": [str(src / "cpu"), str(src / "include"), str(src)],
        "cflags": CFLAGS,
    }
    (build / "spec.json").write_text(json.dumps(spec))
    (build / "build.py").write_text(BUILD_SCRIPT)
    env = {**os.environ, "MAX_JOBS": str(os.cpu_count() or 1)}
    run_logged([str(py), str(build / "build.py"), str(build / "spec.json")], log, "kernels (C++ build)", env)
    libs = sorted((build / "out").glob("common_ops*.so"))
    if not libs:
        raise StepFailed(f"kernels failed: the build wrote no common_ops library; log: {log}")
    tmp = cache_dir.with_name(cache_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy2(libs[0], tmp / libs[0].name)
    tmp.rename(cache_dir)  # atomic: a cache directory is complete or absent
    shutil.rmtree(build, ignore_errors=True)
    return cache_dir / libs[0].name


def sgl_kernel_dir(py: Path) -> Path:
    code = "import importlib.util, os; print(os.path.dirname(importlib.util.find_spec('sgl_kernel').origin))"
    out = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise StepFailed(f"install failed: sgl_kernel is not importable by {py}: {out.stderr.strip()[-300:]}")
    return Path(out.stdout.strip())


def file_sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def check_kernels(py: Path, log: Path) -> None:
    """The installed library loads and registers the ops SGLang's CPU path imports at module load."""
    code = (
        "import os; os.environ.setdefault('SGLANG_USE_CPU_ENGINE', '1')\n"
        "import torch, sgl_kernel\n"
        "for op in ('assign_req_to_token_pool_cpu', 'copy_all_layer_kv_cache_cpu', 'rmsnorm_cpu'):\n"
        "    getattr(torch.ops.sgl_kernel, op)\n"
        "print('ok', sgl_kernel.common_ops.__file__)"
    )
    with open(log, "ab") as f:
        rc = subprocess.run([str(py), "-c", code], stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).returncode  # fmt: skip
    if rc != 0:
        raise StepFailed(f"check failed: sgl_kernel does not load the CPU kernels; log: {log}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", default=os.environ.get("MTP_RL_SGLANG_VENV") or str(DEFAULT_VENV))
    ap.add_argument("--kernel-src", default=os.environ.get("MTP_RL_SGLANG_CPU_SRC") or str(default_source()))
    ap.add_argument("--kernel-cache", default=str(CACHE / "sglang-cpu-kernels"))
    ap.add_argument("--python", default=sys.executable, help="interpreter that creates the venv (3.10+)")
    a = ap.parse_args(argv)
    venv, src = Path(a.venv).expanduser(), Path(a.kernel_src).expanduser().resolve()
    log_dir = CACHE / "logs"
    t0 = time.monotonic()
    step = "venv"
    try:
        py = venv_python(venv)
        if py.exists():
            say(f"venv: {venv} (present)")
        else:
            run_logged([a.python, "-m", "venv", str(venv)], log_dir / "sglang-venv.log", "venv")
            say(f"venv: created {venv}")
        step = "pip"
        record_path = venv / RECORD
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        versions = installed_versions(py)
        if versions.get("sglang") == SGLANG_VERSION and versions.get("sglang-router"):
            say(f"pip: sglang {versions['sglang']}, sglang-router {versions['sglang-router']} (present)")
        else:
            say(f"pip: installing {' '.join(PACKAGES)} (several minutes; log {log_dir / 'sglang-pip.log'})")
            run_logged([str(py), "-m", "pip", "install", "--quiet", *PACKAGES], log_dir / "sglang-pip.log", "pip")
            versions = installed_versions(py)
            say(f"pip: installed sglang {versions.get('sglang')}, sglang-router {versions.get('sglang-router')}")
        record.update(sglang=versions.get("sglang"), sglang_router=versions.get("sglang-router"))
        if has_cuda():
            say("kernels: NVIDIA driver found, SGLang's own CUDA kernels are used (no CPU build)")
            record["cpu_kernels"] = None
        else:
            step = "toolchain"
            say(f"toolchain: {ensure_toolchain(log_dir / 'sglang-apt.log')}")
            step = "kernels"
            if not (src / "cpu" / "torch_extension_cpu.cpp").is_file():
                raise StepFailed(f"kernels failed: no SGLang CPU kernel source at {src} (set MTP_RL_SGLANG_CPU_SRC)")
            digest = source_hash(src, versions.get("torch") or "")
            klog = log_dir / f"sglang-kernels-{digest}.log"
            cache_dir = Path(a.kernel_cache).expanduser() / digest
            cached = bool(sorted(cache_dir.glob("common_ops*.so")))
            if not cached:
                say(f"kernels: building SGLang's CPU kernels from {src} (about 5 min on 2 cores; log {klog})")
            lib = build_kernels(py, src, cache_dir, klog)
            say(f"kernels: {lib}{' (cached)' if cached else ' (built)'}")
            step = "install"
            dest = sgl_kernel_dir(py) / lib.name
            sha = file_sha(lib)
            if record.get("cpu_kernels", {}) and record["cpu_kernels"].get("sha256") == sha and dest.exists() \
                    and file_sha(dest) == sha:  # fmt: skip
                say(f"install: {dest} (present)")
            else:
                shutil.copy2(lib, dest)
                step = "check"
                check_kernels(py, klog)
                say(f"install: {dest} (loads, CPU ops registered)")
            record["cpu_kernels"] = {"hash": digest, "source": str(src), "library": str(dest), "sha256": sha}
        record_path.write_text(json.dumps(record, indent=1) + "\n")
    except StepFailed as e:
        print(f"make sglang: error: {e}", file=sys.stderr)
        return 1
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        print(f"make sglang: error: {step} failed: {e}", file=sys.stderr)
        return 1
    say(f"done in {time.monotonic() - t0:.0f}s: {py} (record {venv / RECORD})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
