"""Training-step time and peak memory of each MTP regime relative to ``detach``, in one run.

One fixed rollout batch (generated once with the local engine) is trained on by every regime
in interleaved repetitions (regime order shuffled each repetition); the timed part is what a
regime changes: the old-log-prob pass plus the optimizer steps of one RL step. Prints the
median and min–max spread per regime and ratios against ``detach``; the headline is
``occ / policy`` (OCC's statistics and its one all-reduce). Peak memory: CUDA's allocator
peak when on GPU; on CPU, with ``--memory``, one subprocess per regime samples its resident
memory every millisecond during a step and reports the peak above the level before it.

    .venv/bin/python tools/bench_step.py --preset tiny-moe --reps 7
    torchrun --nproc_per_node 8 tools/bench_step.py --preset ... (on a GPU node)
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time

import torch
from megatron.core import parallel_state

REGIMES = ["none", "detach", "ce", "policy", "occ"]


def _setup(argv):
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.rl import grpo_advantages
    from megatron_mtp_rl.train.loop import prepare
    from megatron_mtp_rl.train.step import build_micro_batches, generate

    cfg = parse_config(["--quiet", "--mtp-regime", "occ", *argv])
    ctx, state = prepare(cfg)
    batch, _ = generate(ctx, 1, state.cursor)
    rewards = torch.tensor([s.reward for s in batch.samples])
    if rewards.max() == rewards.min():  # an untrained model: give the loss something to do
        rewards = torch.rand(len(batch.samples), generator=torch.Generator().manual_seed(0))
    adv = grpo_advantages(rewards, cfg.rollout.n_samples_per_prompt)
    dp = parallel_state.get_data_parallel_world_size()
    per = cfg.optim.global_batch_size // dp
    samples = batch.samples

    def minibatches():
        return [
            build_micro_batches(
                samples[i : i + per], adv[i : i + per].tolist(), cfg.optim.micro_batch_size, cfg.data.seq_length, False
            )
            for i in range(0, len(samples), per)
        ]

    return ctx, minibatches


def _one_step(ctx, minibatches, regime: str) -> float:
    from megatron_mtp_rl.rl import get_regime
    from megatron_mtp_rl.train.builders import build_loss
    from megatron_mtp_rl.train.step import compute_old_logprobs, train_step

    run = ctx.run
    loss_cfg = build_loss(ctx.cfg.replace(mtp__mtp_regime=regime))
    mbs = minibatches()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    compute_old_logprobs(run.model, [m for mb in mbs for m in mb], with_mtp=get_regime(regime).runs_mtp)
    for mb in mbs:
        train_step(run.model, run.optimizer, mb, loss_cfg, run.occ, clip_grad=ctx.cfg.optim.clip_grad)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _peak_rss_during(fn) -> int:
    """Peak resident memory above the level before ``fn``, sampled every millisecond (CPU)."""
    import threading

    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, peak[0] - base)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    reps = 5
    if "--reps" in argv:
        i = argv.index("--reps")
        reps = int(argv[i + 1])
        del argv[i : i + 2]
    memory = "--memory" in argv
    argv = [a for a in argv if a != "--memory"]
    only = None
    if "--only" in argv:  # child mode: one regime, print peak RSS
        i = argv.index("--only")
        only = argv[i + 1]
        del argv[i : i + 2]
    ctx, minibatches = _setup(argv)
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.train.loop import close

    cfg = ctx.cfg
    if only:
        _one_step(ctx, minibatches, only)  # warm-up: allocator pools, lazy init
        peak = _peak_rss_during(lambda: _one_step(ctx, minibatches, only))
        print(json.dumps({"peak_rss_delta_bytes": peak}))
        close(ctx)
        platform.destroy()
        return

    for r in REGIMES:  # warm-up: allocator, lazy init
        _one_step(ctx, minibatches, r)
    times = {r: [] for r in REGIMES}
    peak = {}
    rng = random.Random(0)
    for _ in range(reps):
        order = REGIMES[:]
        rng.shuffle(order)
        for r in order:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            times[r].append(_one_step(ctx, minibatches, r))
            if torch.cuda.is_available():
                peak[r] = max(peak.get(r, 0), torch.cuda.max_memory_allocated())
    close(ctx)
    platform.destroy()
    if memory and not torch.cuda.is_available():
        for r in REGIMES:
            out = subprocess.run(
                [sys.executable, __file__, "--only", r, *argv], check=True, capture_output=True, text=True
            ).stdout
            peak[r] = json.loads(out.strip().splitlines()[-1])["peak_rss_delta_bytes"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    samples = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    print(f"{device}; preset {cfg.model.preset}, {samples} samples/step, {reps} interleaved repetitions")
    ref = statistics.median(times["detach"])
    print("regime | median step (s) | spread (min–max) | time / detach | peak memory / detach")
    for r in REGIMES:
        med = statistics.median(times[r])
        mem = f"{peak[r] / max(peak['detach'], 1):.3f}x" if peak else "n/a (add --memory on CPU)"
        print(f"{r:6s} | {med:15.3f} | {min(times[r]):.3f}–{max(times[r]):.3f} | {med / ref:13.3f}x | {mem}")
    ratio = statistics.median(times["occ"]) / statistics.median(times["policy"])
    print(f"headline: occ / policy step time = {ratio:.3f}x (goal ≤ 1.02)")


if __name__ == "__main__":
    main()
