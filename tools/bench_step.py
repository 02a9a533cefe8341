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

``--length-dist lognormal`` instead: fixed vs token-budget micro-batches on skewed response lengths
(padding fraction, DP token imbalance, peak memory, step time); see :func:`main_lengths`.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
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


def _pop(argv: list[str], name: str, default, kind=int):
    if name in argv:
        i = argv.index(name)
        value = kind(argv[i + 1])
        del argv[i : i + 2]
        return value
    return default


def _lognormal_samples(n: int, median: int, longest: int, prompt: int, vocab: int, seed: int = 0):
    """``n`` samples whose response lengths are log-normal (σ = 1) around ``median``, capped at ``longest``."""
    from megatron_mtp_rl.rollout.manager import Sample

    g = torch.Generator().manual_seed(seed)
    lengths = (torch.randn(n, generator=g) + torch.log(torch.tensor(float(median)))).exp().clamp(1, longest)
    lengths[0] = longest  # the tail the cap is about: one answer at the limit
    out = []
    for r in lengths.long().tolist():
        ids = torch.randint(1, vocab, (prompt + r,), generator=g).tolist()
        out.append(Sample(None, ids[:prompt], ids[prompt:], [], "", True))
    return out


def main_lengths(argv: list[str]) -> None:
    """``--length-dist lognormal``: one RL update (θ_old pass + optimizer steps) on skewed lengths,
    fixed ``--micro-batch-size`` micro-batches vs ``--use-dynamic-batch-size`` (+ ``--balance-data``).
    On CPU, peak memory is the resident-set growth during a step: give ``--modes fixed`` and
    ``--modes dynamic`` to separate runs (a second mode in the same process reuses the first's pages).

        torchrun --nproc_per_node 2 tools/bench_step.py --length-dist lognormal --median-len 64 --max-len 1024 \
            --samples 64 --max-tokens-per-gpu 2048 --preset tiny-dense --micro-batch-size 4
    """
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.builders import build_loss
    from megatron_mtp_rl.train.loop import close, prepare
    from megatron_mtp_rl.train.microbatches import plan_minibatches
    from megatron_mtp_rl.train.step import compute_old_logprobs, train_step
    from megatron_mtp_rl.train.throughput import throughput_metrics

    dist_name = _pop(argv, "--length-dist", "lognormal", str)
    assert dist_name == "lognormal", "only --length-dist lognormal"
    median, longest, n = _pop(argv, "--median-len", 512), _pop(argv, "--max-len", 8192), _pop(argv, "--samples", 64)
    budget, reps = _pop(argv, "--max-tokens-per-gpu", 2 * longest), _pop(argv, "--reps", 2)
    only = _pop(argv, "--modes", "fixed,dynamic", str).split(",")  # on CPU run one per process: RSS peaks
    prompt = 16
    base = ["--quiet", "--seq-length", str(prompt + longest), "--global-batch-size", str(n)]
    base += ["--rollout-batch-size", str(n // 4), "--n-samples-per-prompt", "4"]
    cfg = parse_config([*base, *argv])
    ctx, _ = prepare(cfg)
    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    samples = _lognormal_samples(n, median, longest, prompt, ctx.run.model_args.vocab_size)
    adv = torch.randn(n, generator=torch.Generator().manual_seed(1))
    mine = slice(rank * n // dp, (rank + 1) * n // dp)  # each rank's own rollouts, as generated
    loss_cfg = build_loss(cfg)
    modes = {
        "fixed": cfg,
        "dynamic": cfg.replace(optim__use_dynamic_batch_size=True, optim__max_tokens_per_gpu=budget),
    }
    rows = {}
    for name, c in ((k, v) for k, v in modes.items() if k in only):
        times, peaks, perf = [], [], {}
        for rep in range(reps + 1):  # the first is a warm-up
            mbs = plan_minibatches(c, samples[mine], adv[mine], 7) if name == "dynamic" else None
            if mbs is None:
                from megatron_mtp_rl.train.step import build_micro_batches

                own = samples[mine]
                mbs = [build_micro_batches(own, adv[mine].tolist(), c.optim.micro_batch_size, c.data.seq_length, False)]
            flat = [b for m in mbs for b in m]

            def step(flat=flat, mbs=mbs):
                compute_old_logprobs(ctx.run.model, flat, with_mtp=loss_cfg.regime.runs_mtp)
                for m in mbs:
                    train_step(ctx.run.model, ctx.run.optimizer, m, loss_cfg, ctx.run.occ)

            if torch.cuda.is_available():
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            peak = _peak_rss_during(step) if not torch.cuda.is_available() else None
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated()
            dt = time.perf_counter() - t0
            if rep:
                times.append(dt)
                peaks.append(peak)
            perf = throughput_metrics(
                c, ctx.run.model_args, flat, with_mtp=loss_cfg.runs_mtp, train_time=dt, step_time=dt
            )
        t = torch.tensor([statistics.median(times), max(peaks)], dtype=torch.float64)
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        rows[name] = (len(flat), perf, float(t[0]), float(t[1]))
    close(ctx)
    platform.destroy()
    if rank == 0:
        device = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
        )
        lens = sorted(len(s.response_ids) for s in samples)
        print(f"{device}; preset {cfg.model.preset}; DP={dp}; {n} samples, response lengths log-normal median "
              f"{median} (measured {lens[n // 2]}), max {lens[-1]}, prompt {prompt}; budget {budget} tokens; "
              f"{reps} timed repetitions after a warm-up")  # fmt: skip
        print("mode    | micro-batches/rank | padding fraction | DP token imbalance | peak memory (GiB) | step (s)")
        for name, (count, perf, dt, peak) in rows.items():
            print(f"{name:7s} | {count:18d} | {perf['perf/padding_fraction']:16.3f} | "
                  f"{perf['perf/dp_token_imbalance']:18.3f} | {peak / 2**30:17.3f} | {dt:.2f}")  # fmt: skip
        if len(rows) < 2:
            return
        f, d = rows["fixed"], rows["dynamic"]
        print(f"dynamic / fixed: step time {d[2] / f[2]:.2f}x, peak memory {d[3] / max(f[3], 1):.2f}x")


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--length-dist" in argv:
        return main_lengths(argv)
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
