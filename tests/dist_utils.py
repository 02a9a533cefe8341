"""Run a function on N gloo ranks on 127.0.0.1 and collect what each rank returns."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import traceback
from pathlib import Path

import torch


def free_port(span: int = 1) -> int:
    """A free loopback port below the kernel's ephemeral range (``span`` consecutive ones free).

    Ports handed out by ``bind(0)`` come from the ephemeral range, where the local ends of
    outgoing connections (health probes, HTTP clients) can take them before the server that
    was meant to listen there starts; staying below that range avoids the race.
    """
    import random

    lo, hi = 20000, 32000
    try:
        lo_eph = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
        hi = min(hi, lo_eph - span - 1)
    except OSError:
        pass
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(lo, hi)
        try:
            for p in range(port, port + span):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port found")


def _entry(fn, rank, world, port, out_dir, args):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        CUDA_VISIBLE_DEVICES="",
    )
    torch.set_num_threads(1)
    out = Path(out_dir)
    try:
        result = fn(rank, world, *args)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        from megatron_mtp_rl import platform

        platform.destroy()


def run_ranks(fn, world_size: int, tmp_path: Path, *args, timeout: float = 300.0) -> list:
    """Spawn ``world_size`` processes running ``fn(rank, world, *args)``; return results."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, str(tmp_path), args)) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    try:
        while any(p.is_alive() for p in procs):
            if any(p.exitcode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join(5)
    errors = [
        (tmp_path / f"rank{r}.err").read_text() for r in range(world_size) if (tmp_path / f"rank{r}.err").exists()
    ]
    if errors:
        raise AssertionError("a rank failed:\n" + "\n".join(errors))
    codes = [p.exitcode for p in procs]
    if any(c != 0 for c in codes):
        raise AssertionError(f"ranks exited with {codes} (timeout {timeout}s?)")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world_size)]
