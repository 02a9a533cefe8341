"""Chunked vocab-parallel log-probs vs naive ``log_softmax`` + ``gather`` and vs megatron-core's
fused vocab-parallel cross-entropy (what slime computes log-probs with): time and memory.

Each variant runs in its own subprocess so its peak resident memory (``ru_maxrss``) is
its own; "extra" memory is the peak minus the resident size right after the logits exist.
Printed as ratios ours / naive from one run. Example:

    .venv/bin/python tools/bench_logprobs.py --tokens 4096 --vocab 151936
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch

COMPILE = "MTP_RL_COMPILE_LOGPROBS"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _run_variant(variant: str, mode: str, tokens: int, vocab: int, chunk: int, dtype: str, reps: int):
    from megatron_mtp_rl.ops import vocab_parallel_logprobs

    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, dtype=DTYPES[dtype])
    targets = torch.randint(0, vocab, (tokens,))
    if variant == "megatron":
        _tp_group()
    compile_s = 0.0
    if variant == "ours":  # MTP_RL_COMPILE_LOGPROBS=1: compile once (every chunk shape) before measuring
        t0 = time.perf_counter()
        rows = 2 * (chunk or max(1, 2**24 // vocab)) + 1
        warm = logits[:rows].detach().requires_grad_()
        vocab_parallel_logprobs(warm, targets[:rows], chunk_size=chunk).sum().backward()
        compile_s = time.perf_counter() - t0
        del warm
    base = psutil.Process().memory_info().rss
    # megatron's copy of the logits stands for the logits tensor itself, which every variant has.
    own_copy = logits.numel() * logits.element_size() if variant == "megatron" else 0
    times = []
    for _ in range(reps):
        x = logits.detach().requires_grad_(mode == "fwd+bwd")
        t0 = time.perf_counter()
        with torch.set_grad_enabled(mode == "fwd+bwd"):
            if variant == "naive":
                lp = torch.log_softmax(x.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
            elif variant == "megatron":
                # It works in place on fp32 logits (it would clobber ours): give it its own copy,
                # made before the clock starts, as a fresh logits tensor would be in training.
                t0 = _megatron_input(x, t0)
                lp = -_megatron_ce()(x_m[0], targets, _tp_group())
            else:
                lp = vocab_parallel_logprobs(x, targets, chunk_size=chunk)
            if mode == "fwd+bwd":
                lp.sum().backward()
        times.append(time.perf_counter() - t0)
        del lp, x
        x_m[0] = None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    grad_bytes = logits.numel() * logits.element_size() if mode == "fwd+bwd" else 0
    return {
        "time_s": statistics.median(times),
        "extra_bytes": max(0, peak - base - own_copy),
        "grad_bytes": grad_bytes,
        "compile_s": compile_s,
    }


x_m: list = [None]


def _megatron_input(x: torch.Tensor, t0: float) -> float:
    """Copy ``x`` for megatron's in-place kernel outside the timed region; returns the new start time."""
    x_m[0] = x.detach().clone().requires_grad_(x.requires_grad)
    return time.perf_counter()


def _megatron_ce():
    from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy

    return fused_vocab_parallel_cross_entropy


def _tp_group():
    """A one-process gloo group: megatron's kernel all-reduces over its TP group."""
    import torch.distributed as dist

    if not dist.is_initialized():
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    return dist.group.WORLD


def _interleaved(tokens: int, vocab: int, chunk: int | None, dtype: str, reps: int) -> None:
    """Time only, one process: eager ours, compiled ours and megatron's kernel taken in turns, so a
    busy machine's drifting load hits all three alike; prints median ratios (compile untimed)."""

    from megatron_mtp_rl.ops import vocab_parallel_logprobs

    torch.manual_seed(0)
    logits = torch.randn(tokens, vocab, dtype=DTYPES[dtype])
    targets = torch.randint(0, vocab, (tokens,))
    group = _tp_group()

    def run(variant: str, backward: bool) -> float:
        x = logits.detach().clone().requires_grad_(backward)  # megatron's kernel overwrites its input
        os.environ["MTP_RL_COMPILE_LOGPROBS"] = "1" if variant == "compiled" else "0"
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward):
            if variant == "megatron":
                lp = -_megatron_ce()(x, targets, group)
            else:
                lp = vocab_parallel_logprobs(x, targets, chunk_size=chunk)
            if backward:
                lp.sum().backward()
        return time.perf_counter() - t0

    for backward in (False, True):
        t0 = time.perf_counter()
        run("compiled", backward)
        print(f"compile + first call ({'fwd+bwd' if backward else 'fwd'}): {time.perf_counter() - t0:.1f}s")
    for backward in (False, True):
        times: dict[str, list[float]] = {"eager": [], "compiled": [], "megatron": []}
        for _ in range(reps):
            for v in times:
                times[v].append(run(v, backward))
        med = {v: statistics.median(t) for v, t in times.items()}
        mode = "fwd+bwd" if backward else "fwd"
        print(
            f"{mode:8s} median of {reps}: eager {med['eager']:.3f}s compiled {med['compiled']:.3f}s megatron "
            f"{med['megatron']:.3f}s | eager/megatron {med['eager'] / med['megatron']:.2f}x "
            f"compiled/megatron {med['compiled'] / med['megatron']:.2f}x"
        )


def _max_abs_diff(vocab: int, chunk: int, dtype: str) -> float:
    from megatron_mtp_rl.ops import vocab_parallel_logprobs

    torch.manual_seed(1)
    logits = torch.randn(256, vocab, dtype=DTYPES[dtype])
    targets = torch.randint(0, vocab, (256,))
    ref = torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1)
    return (vocab_parallel_logprobs(logits, targets, chunk_size=chunk) - ref).abs().max().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument(
        "--chunk",
        type=int,
        default=None,
        help="rows per chunk (default: ~64 MiB of fp32 per chunk)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--interleaved", action="store_true", help="time only: ours eager / compiled / megatron in turns")
    p.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.interleaved:
        return _interleaved(a.tokens, a.vocab, a.chunk, a.dtype, a.reps)
    if a._child:
        res = _run_variant(a._child[0], a._child[1], a.tokens, a.vocab, a.chunk, a.dtype, a.reps)
        print(json.dumps(res))
        return
    gib = 2**30
    print(f"T={a.tokens} V={a.vocab} dtype={a.dtype} chunk={a.chunk} torch threads={torch.get_num_threads()}")
    print(f"max |ours - naive| on 256 tokens: {_max_abs_diff(a.vocab, a.chunk, a.dtype):.2e}")
    for mode in ("fwd", "fwd+bwd"):
        res = {}
        for variant in ("naive", "megatron", "ours"):
            cmd = [
                sys.executable,
                __file__,
                "--tokens",
                str(a.tokens),
                "--vocab",
                str(a.vocab),
                "--dtype",
                a.dtype,
                "--reps",
                str(a.reps),
                "--_child",
                variant,
                mode,
            ]
            if a.chunk:
                cmd += ["--chunk", str(a.chunk)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res[variant] = json.loads(out.strip().splitlines()[-1])
        n, m, o = res["naive"], res["megatron"], res["ours"]
        print(
            f"{mode:8s} vs megatron fused CE: time megatron {m['time_s']:.3f}s ours {o['time_s']:.3f}s "
            f"ratio {o['time_s'] / m['time_s']:.2f}x | extra memory megatron {m['extra_bytes'] / gib:.2f} GiB "
            f"ours {o['extra_bytes'] / gib:.2f} GiB ratio {o['extra_bytes'] / max(1, m['extra_bytes']):.3f}x"
            + (f" (ours compiled first, untimed: {o['compile_s']:.1f}s)" if os.environ.get(COMPILE) == "1" else "")
        )
        line = (
            f"{mode:8s} time naive {n['time_s']:.3f}s ours {o['time_s']:.3f}s "
            f"ratio {o['time_s'] / n['time_s']:.2f}x | extra memory "
            f"naive {n['extra_bytes'] / gib:.2f} GiB ours {o['extra_bytes'] / gib:.2f} GiB "
            f"ratio {o['extra_bytes'] / max(1, n['extra_bytes']):.3f}x"
        )
        if mode == "fwd+bwd":
            g = n["grad_bytes"]
            line += (
                f" | beyond the logits gradient ({g / gib:.2f} GiB, needed by both): ratio "
                f"{max(0, o['extra_bytes'] - g) / max(1, n['extra_bytes'] - g):.3f}x"
            )
        print(line)


if __name__ == "__main__":
    main()
