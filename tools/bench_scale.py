"""Peak memory per rank of every path that moves a large checkpoint's weights, as a multiple of the model.

Builds a random GLM-4.5-shaped HF release of about ``--size-gb`` (tests/hf_release.py: hidden 1024,
4 layers + 1 MTP layer, the expert count chosen for the size; sharded with an index, fp32 router bias,
``--fp8`` for DeepSeek-V3's block fp8), then for each of ``--ranks`` (gloo, one spawned process per
rank) runs each phase and prints, per rank, the peak resident memory above the level right before
the phase (after the imports; for the weight pushes, after building and loading the model), as a
multiple of the model's bf16 bytes, the phase's time and, for the streamed phases (mcore-to-hf, the
pushes), the bound they are held to: two shards (buckets, ``--bucket-mb``) plus the largest tensor:

* ``load``        direct HF load in training: ``hf.load.load_hf`` into the model built at EP=N
                  (``--layout pp``: PP=N);
* ``hf-to-mcore`` ``tools/convert_checkpoint.py hf-to-mcore`` (``--expert-model-parallel-size N``);
* ``mcore-to-hf`` ``tools/convert_checkpoint.py mcore-to-hf``;
* ``push-disk`` / ``push-dist``  one weight push (``cluster/weight_sync.py``, disk and distributed modes)
  against tests/fake_sglang_server.py, from the model built at EP=N (``--layout pp``: PP=N).

A phase whose API this checkout lacks prints ``n/a (not available)``. The peak is the kernel's
high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the phase; where that
is not allowed, ``ru_maxrss``); the heap is trimmed (glibc ``malloc_trim``) before the level is read.

    .venv/bin/python tools/bench_scale.py --size-gb 0.25
    .venv/bin/python tools/bench_scale.py --size-gb 0.75 --ranks 1 2 --fp8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("load", "hf-to-mcore", "mcore-to-hf", "push-disk", "push-dist")
HIDDEN, LAYERS, MTP_LAYERS = 1024, 4, 1
NA = "n/a (not available)"
BOUNDED = {"mcore-to-hf": True, "push-disk": True, "push-dist": True}  # phases held to the bound below


# ---------------------------------------------------------------------------------------------
# Memory of this process


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trim_heap() -> None:
    """Return the heap's free memory to the OS (glibc), so the level before a phase is what is live."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(reset_ok: bool) -> int:
    if reset_ok:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---------------------------------------------------------------------------------------------
# The release


def build_release(out: Path, size_gb: float, fp8: bool, shards: int) -> dict:
    """A GLM-4.5-shaped release of about ``size_gb`` bf16 bytes in ``out`` (kept: rebuilt only when the
    size or fp8 changes); returns its facts (model bytes, largest tensor, experts)."""
    sys.path.insert(0, str(ROOT))
    from tests.hf_release import release_tensors, write_release

    h = HIDDEN
    per_expert = 3 * h * (h // 2) * 2 * (LAYERS - 1 + MTP_LAYERS)  # gate/up/down of every MoE layer, bf16
    attn = (2 * h * h + 2 * h * 256) * 2 * (LAYERS + MTP_LAYERS)
    rest = attn + 6 * h * h * 2 + 1.5 * h * h * 2 * (LAYERS - 1 + MTP_LAYERS) + 2 * h * h * 2
    experts = 4 * max(1, round((size_gb * 1e9 - rest) / per_expert / 4))  # EP=1, 2 and 4 divide it
    facts_file = out / "bench.json"
    if facts_file.exists():
        facts = json.loads(facts_file.read_text())
        if (facts["size_gb"], facts["fp8"], facts["shards"], facts["experts"]) == (size_gb, fp8, shards, experts):
            return facts
    config, tensors = release_tensors(
        "glm4_moe", hidden=h, layers=LAYERS, experts=experts, mtp_layers=MTP_LAYERS, fp8=fp8, seed=0
    )
    # the model's bytes once loaded (bf16; fp8 weights dequantised, their scales gone)
    model_bytes = sum(
        t.numel() * (4 if t.dtype.is_floating_point and t.element_size() == 4 else 2)
        for n, t in tensors.items()
        if not n.endswith("_scale_inv")
    )
    largest = max(t.numel() * max(t.element_size(), 2) for t in tensors.values())
    if out.exists():
        for f in out.glob("*"):
            f.unlink()
    write_release(out, config, tensors, shards)
    del tensors
    facts = dict(size_gb=size_gb, fp8=fp8, shards=shards, experts=experts, model_bytes=model_bytes,
                 largest_tensor_bytes=largest, hidden=h, layers=LAYERS, mtp_layers=MTP_LAYERS)  # fmt: skip
    facts_file.write_text(json.dumps(facts))
    return facts


# ---------------------------------------------------------------------------------------------
# One phase on one rank (a spawned worker process)


def _convert_tool():
    sys.path.insert(0, str(ROOT))
    from tests.tool_loader import load_tool

    return load_tool("convert_checkpoint")


def _import_converter_modules() -> None:
    """What the converter imports lazily, imported before the measure (the peak is above the imports)."""
    import importlib

    for name in ("megatron_mtp_rl.models", "megatron_mtp_rl.hf.load", "megatron_mtp_rl.hf.shards",
                 "megatron_mtp_rl.cluster.weight_sync", "megatron_mtp_rl.train.checkpoint",
                 "megatron_mtp_rl.train.checkpoint_stream"):  # fmt: skip
        try:
            importlib.import_module(name)
        except ImportError:  # an older checkout
            pass


def _cli_accepts(tool, argv: list[str]) -> bool:
    """Whether the converter's parser takes ``argv`` (an older checkout lacks the parallel flags)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stderr(io.StringIO()):
            tool.build_parser().parse_args(argv)
        return True
    except SystemExit:
        return False


def _sizes(world: int, layout: str):
    from megatron_mtp_rl.platform.distributed import ParallelSizes

    if layout == "pp":
        return ParallelSizes(pipeline_model_parallel_size=world)
    return ParallelSizes(expert_model_parallel_size=world)


def _parallel_flags(world: int, layout: str) -> list[str]:
    if world == 1:
        return []
    return ["--pipeline-model-parallel-size" if layout == "pp" else "--expert-model-parallel-size", str(world)]


def _prepare(phase: str, a) -> tuple[object, str | None]:
    """Set up what the phase needs but does not measure; returns (the measured callable, or None with why)."""
    world = a.world
    if phase in ("hf-to-mcore", "mcore-to-hf"):
        tool = _convert_tool()
        _import_converter_modules()
        if phase == "hf-to-mcore":
            argv = ["hf-to-mcore", "--hf-dir", a.hf_dir, "--save", a.mcore_dir, "--dtype", "bf16"]
        else:
            # shards of the push bucket's size: the export's peak then follows the shard, not the model
            argv = ["mcore-to-hf", "--load", a.mcore_dir, "--out", a.out_dir, "--max-shard-size", f"{a.bucket_mb}MiB"]
        argv += _parallel_flags(world, a.layout)
        if not _cli_accepts(tool, argv):
            return None, NA
        return (lambda: tool.main(argv)), None

    from megatron_mtp_rl import platform

    if phase == "load":
        try:
            from megatron_mtp_rl.hf.load import load_hf
        except ImportError:
            return None, NA
        from megatron_mtp_rl.models import build_model

        platform.initialize(_sizes(world, a.layout))
        tool = _convert_tool()
        margs = tool.model_args_from_hf_config(tool.read_hf_config(a.hf_dir), params_dtype="bf16")

        def run():
            model = build_model(margs)
            load_hf(model, a.hf_dir)

        return run, None

    # push-disk / push-dist: the model built and loaded first (not measured)
    from megatron_mtp_rl.cluster.weight_sync import WeightSync
    from megatron_mtp_rl.models import build_model
    from megatron_mtp_rl.models.presets import ModelArgs
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
    from megatron_mtp_rl.train.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state

    if not (Path(a.mcore_dir) / "latest_checkpointed_iteration.txt").exists():
        return None, "n/a (no converted checkpoint: hf-to-mcore failed)"
    platform.initialize(_sizes(world, a.layout))
    saved = read_trainer_state(latest_checkpoint(a.mcore_dir))["model_args"]
    margs = ModelArgs(**{k: v for k, v in saved.items() if k in ModelArgs.__dataclass_fields__})
    model = build_model(margs)
    load_checkpoint(a.mcore_dir, model, None)
    engine = SGLangEngine(a.engine_url) if a.rank == 0 else None
    mode = "disk" if phase == "push-disk" else "distributed"
    sync = WeightSync(engine, model, margs, mode=mode, bucket_bytes=a.bucket_mb << 20, export_dir=a.out_dir,
                      max_shard_size=a.bucket_mb << 20)  # fmt: skip
    return sync, None


def worker(a) -> None:
    """Run one phase on this rank and print one ``BENCH {json}`` line."""
    import torch

    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // a.world))
    result = {"rank": a.rank, "phase": a.phase}
    try:
        run, why = _prepare(a.phase, a)
        if run is None:
            result["status"] = why
        else:
            trim_heap()  # what the set-up freed but the heap kept must not hide the phase's growth
            base = rss_bytes()
            ok = reset_peak()
            t0 = time.perf_counter()
            rc = run()
            result["seconds"] = time.perf_counter() - t0
            result["peak_above"] = max(peak_bytes(ok) - base, 0)
            result["status"] = "ok" if rc in (None, 0) or isinstance(rc, dict) else f"exit {rc}"
    except Exception as e:  # a phase that fails is reported, the others still run
        result["status"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    print("BENCH " + json.dumps(result), flush=True)
    try:
        from megatron_mtp_rl import platform

        platform.destroy()
    except Exception:
        pass


# ---------------------------------------------------------------------------------------------
# The driver


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.2)
    return False


def run_phase(phase: str, world: int, a, paths: dict, mcore: Path, engine_url: str) -> list[dict]:
    port = _free_port()
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
               PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(max(1, 2 // world)))  # fmt: skip
    procs = []
    for rank in range(world):
        argv = [sys.executable, __file__, "--worker", phase, "--rank", str(rank), "--world", str(world),
                "--layout", a.layout, "--hf-dir", str(paths["hf"]), "--mcore-dir", str(mcore),
                "--out-dir", str(paths["out"] / f"{phase}-{world}"), "--engine-url", engine_url,
                "--bucket-mb", str(a.bucket_mb)]  # fmt: skip
        procs.append(subprocess.Popen(argv, env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))  # fmt: skip
    results = []
    for rank, p in enumerate(procs):
        timed_out = False
        try:
            out, err = p.communicate(timeout=a.timeout)
        except subprocess.TimeoutExpired:  # a result printed before a hang at exit still counts
            p.kill()
            out, err = p.communicate()
            timed_out = True
        lines = [x for x in out.splitlines() if x.startswith("BENCH ")]
        if timed_out and not lines:
            results.append({"rank": rank, "status": f"timeout ({a.timeout:g} s)"})
        elif lines:
            results.append(json.loads(lines[-1][6:]))
        else:
            tail = [x for x in err.strip().splitlines() if x.strip()][-1:] or ["?"]
            results.append({"rank": rank, "status": f"crashed (rc {p.returncode}): {tail[0][:160]}"})
    return results


def describe(results: list[dict], model_bytes: int, bound: float | None = None) -> str:
    bad = [r["status"] for r in results if r.get("status") != "ok"]
    if bad:
        return bad[0]
    peaks = [r["peak_above"] / model_bytes for r in results]
    secs = max(r["seconds"] for r in results)
    per = " ".join(f"{p:.2f}" for p in peaks)
    within = "" if bound is None else f"  bound {bound:.2f}x ({'within' if max(peaks) <= bound else 'ABOVE'})"
    return f"peak/rank {max(peaks):.2f}x model (ranks: {per}){within}  time {secs:.1f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--size-gb", type=float, default=0.25, help="bf16 bytes of the random release")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="gloo world sizes to run")
    p.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    p.add_argument("--layout", choices=["ep", "pp"], default="ep", help="what N ranks split: experts or stages")
    p.add_argument("--fp8", action="store_true", help="store the release in DeepSeek-V3's block fp8")
    p.add_argument("--shards", type=int, default=5, help="safetensors files of the release")
    p.add_argument("--bucket-mb", type=int, default=64, help="weight push bucket (--update-weight-buffer-size)")
    p.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "bench_scale"), help="scratch directory")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per phase run")
    # worker-only
    for flag in ("--worker", "--hf-dir", "--mcore-dir", "--out-dir", "--engine-url"):
        p.add_argument(flag, help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        a.phase = a.worker
        worker(a)
        return 0

    sys.path.insert(0, str(ROOT))
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()  # the release builder imports megatron-core
    work = Path(a.work)
    tag = f"{a.size_gb:g}gb" + ("-fp8" if a.fp8 else "")
    paths = {"hf": work / f"release-{tag}", "out": work / f"out-{tag}"}
    shutil.rmtree(paths["out"], ignore_errors=True)  # converted checkpoints and exports of an earlier run
    t0 = time.perf_counter()
    facts = build_release(paths["hf"], a.size_gb, a.fp8, a.shards)
    mb = facts["model_bytes"]
    print(f"release {paths['hf']}: glm4_moe hidden {facts['hidden']}, {facts['layers']}+{facts['mtp_layers']} "
          f"layers, {facts['experts']} experts, {mb / 1e9:.3f} GB bf16, largest tensor "
          f"{facts['largest_tensor_bytes'] / 1e6:.1f} MB, {a.shards} shards{', fp8' if a.fp8 else ''} "
          f"(built in {time.perf_counter() - t0:.0f} s); push bucket {a.bucket_mb} MB", flush=True)  # fmt: skip
    # what the streamed paths may hold above their start: two shards (buckets) plus the largest tensor
    bound = (2 * (a.bucket_mb << 20) + facts["largest_tensor_bytes"]) / mb
    print(f"bound of mcore-to-hf and the pushes: 2 x {a.bucket_mb} MiB + the largest tensor = {bound:.2f}x model")
    engine_port = _free_port()
    engine = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fake_sglang_server.py"), "--port", str(engine_port),
         "--model-path", str(paths["hf"])],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    if engine.poll() is not None or not _wait_listening(engine_port):
        print("the fake SGLang engine did not start: the push phases will fail", file=sys.stderr)
    try:
        for n in a.ranks:
            for phase in a.phases:
                # hf-to-mcore writes this N's checkpoint; mcore-to-hf and the pushes read it, else the
                # 1-rank one (a dist checkpoint loads at any layout)
                mcore = paths["out"] / f"mcore-{n}"
                if phase != "hf-to-mcore" and not mcore.exists():
                    mcore = paths["out"] / "mcore-1"
                res = run_phase(phase, n, a, paths, mcore, f"http://127.0.0.1:{engine_port}")
                print(f"{phase:12s} N={n} ({a.layout}): {describe(res, mb, BOUNDED.get(phase) and bound)}", flush=True)
    finally:
        engine.terminate()
        engine.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
