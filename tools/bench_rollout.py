"""Rollout throughput: plain vs self-speculative decoding at batch 1 / 8 / 64, and sync vs async RL.

Generates from the same held-out prompts with both modes, interleaving repetitions so that
the ratios come from one run on the same (shared) machine, and checks that greedy outputs are
identical. Then (unless ``--skip-async``) times RL steps of the demo config with the rollout in
the trainer's process (sync) and in a separate process one step off-policy (``--async-rollout``).
Prints a table and ends with ``speedup_spec_b1=``, ``speedup_spec_b64=`` (greedy) and
``speedup_async=`` lines. Example (after ``make demo`` or the warm start of examples/tiny_cpu):

    .venv/bin/python tools/bench_rollout.py --load runs/demo/warmstart

``--partial-rollout`` benches long generations instead: on the long-tailed arith task it times RL
steps waiting for every sample, with partial rollouts (over-sampling 2×), and with
``--max-off-policy-steps`` K = 1, 2, 4 (with and without partial rollouts), in one run, and prints
step time, generated and wasted tokens per step and the policy-lag histogram of the trained samples:

    .venv/bin/python tools/bench_rollout.py --partial-rollout

Flags after the bench's own are the run's (``--config``, ``--preset`` ...); torch runs with
``--threads`` intra-op threads (1 by default: on a shared 2-core machine more threads make
small ops slower, not faster).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def _clock() -> float:
    """CPU seconds of this process: on a shared machine wall time swings with the neighbours' load,
    while a 1-thread process's CPU time counts only its own work (and both modes are timed alike)."""
    return time.process_time()


def _spec_bench(run, prompts, vocab, *, max_new, eos_id, reps, draft_depths, batches):
    from megatron_mtp_rl.models.generation import SamplingParams, generate

    rows = {}
    identical = True
    run.gpt.eval()  # as an engine does once per rollout
    for temp in (0.0, 1.0):
        sp = SamplingParams(temperature=temp, max_new_tokens=max_new, eos_id=eos_id)
        for b in batches:
            chunks = [prompts[i : i + b] for i in range(0, len(prompts), b)][: max(1, 16 // b) if b < 8 else None]
            tps = {"plain": [], "spec": []}
            accept = []
            for rep in range(reps):
                outs = {}
                for mode in ("plain", "spec") if rep % 2 == 0 else ("spec", "plain"):
                    spec = mode == "spec"
                    t0, tokens, responses = _clock(), 0, []
                    for i, chunk in enumerate(chunks):
                        g = torch.Generator().manual_seed(rep * 1000 + i)
                        out = generate(
                            run.gpt,
                            chunk,
                            sp,
                            vocab_size=vocab,
                            generator=g,
                            speculative=spec,
                            draft_depths=draft_depths,
                        )
                        tokens += out.stats["tokens"]
                        responses += out.responses
                        if spec:
                            accept.append(out.stats["accept_len"])
                    tps[mode].append(tokens / (_clock() - t0))
                    outs[mode] = responses
                if temp == 0.0 and outs["plain"] != outs["spec"]:
                    identical = False
            p, s = statistics.median(tps["plain"]), statistics.median(tps["spec"])
            rows[(temp, b)] = (p, s, statistics.mean(accept))
    return rows, identical


def _rl_steps_per_s(argv: list[str], steps: int, async_rollout: bool) -> tuple[float, float, float]:
    """RL steps/s (wall clock) over ``steps`` steps after a first one (whose rollout nothing overlaps)."""
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training

    extra = ["--async-rollout"] if async_rollout else []
    cfg = parse_config(
        ["--quiet", "--finetune", *argv, "--num-steps", str(steps + 1), "--eval-interval", "1000000"]
        + ["--num-eval-prompts", "8", *extra]
    )
    hist = run_training(cfg)
    rows = [h for h in hist if h["step"] >= 2]
    mean = lambda k: sum(h.get(k, 0.0) for h in rows) / len(rows)  # noqa: E731
    return 1.0 / mean("perf/step_time"), mean("perf/rollout_time"), mean("perf/train_time")


# The long-tailed task of the --partial-rollout bench (flags after the bench's own override these).
SKEWED = [
    "--preset", "tiny-dense", "--arith-digits", "1", "--arith-max-digits", "3", "--arith-ops", "+*",
    "--rollout-batch-size", "8", "--n-samples-per-prompt", "4", "--rollout-max-response-len", "96",
    "--seq-length", "112", "--global-batch-size", "32", "--micro-batch-size", "16", "--num-eval-prompts", "8",
    "--reward-workers", "0", "--lr", "1e-3",
]  # fmt: skip
# Without --load the model is untrained: its response lengths are those of sampling until EOS (1 of 18 ids):
# geometric, mean ≈ 18 tokens, and the longest of a step's 32 samples ≈ 70 or the 96-token limit, so a step
# that waits for every sample decodes 4× the mean length, and generation outweighs training. With --load of a
# warm start on this task they follow the answers' lengths (1 to 6 digits) instead.

PARTIAL_MODES = [  # (name, flags)
    ("wait for all", []),
    ("partial", ["--partial-rollout"]),
    ("K=1", ["--max-off-policy-steps", "1"]),
    ("K=2", ["--max-off-policy-steps", "2"]),
    ("K=4", ["--max-off-policy-steps", "4"]),
    ("partial K=1", ["--partial-rollout", "--max-off-policy-steps", "1"]),
    ("partial K=2", ["--partial-rollout", "--max-off-policy-steps", "2"]),
    ("partial K=4", ["--partial-rollout", "--max-off-policy-steps", "4"]),
]


def _partial_run(argv: list[str], flags: list[str], steps: int) -> dict:
    """One run of ``steps`` steps: mean step time, tokens generated / wasted per step, lag histogram.

    The mean is over the whole run, so every batch trained is generated inside the timed window: with K ahead,
    step 1 generates K batches and the last K steps generate none (a window of steady steps only would credit
    K > 1 with the batches generated before it)."""
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.loop import run_training

    cfg = parse_config(["--quiet", *SKEWED, *argv, "--num-steps", str(steps), "--eval-interval", "1000000", *flags])
    hist = [h for h in run_training(cfg) if h["step"] >= 1]
    per_batch = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    lags: dict[int, float] = {}
    for h in hist:
        keys = [k for k in h if k.startswith("rollout/lag_samples_")]
        for k in keys:
            lag = int(k.rsplit("_", 1)[1])
            lags[lag] = lags.get(lag, 0.0) + h[k]
        if not keys:
            lag = int(h.get("rollout/policy_lag", 0.0))
            lags[lag] = lags.get(lag, 0.0) + per_batch
    gen = [h.get("rollout/generated_tokens", h["rollout/response_len"] * per_batch) for h in hist]
    waste = [h.get("rollout/wasted_tokens", 0.0) for h in hist]
    return {
        "step_time": statistics.mean(h["perf/step_time"] for h in hist),
        "wait_time": statistics.mean(h.get("perf/rollout_wait_time", 0.0) for h in hist),
        "generated": sum(gen) / len(gen),
        "wasted": sum(waste) / len(waste),
        "buffered": hist[-1].get("rollout/buffer_size", 0.0),
        "lags": lags,
        "response_len": statistics.mean(h["rollout/response_len"] for h in hist),
    }


def _two_batches_cost(argv: list[str], reps: int = 3) -> float:
    """Wall time of one engine decoding two batches' rows at once over one batch's (the bench's batch and
    response limit, no EOS, median of ``reps``): what K > 1 could save per batch if an engine decoded the
    batches it runs ahead together (1.0: free, 2.0: no saving)."""
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.models.generation import SamplingParams, generate
    from megatron_mtp_rl.train.builders import build_run
    from megatron_mtp_rl.train.pretrain import Evaluator

    cfg = parse_config(["--quiet", *SKEWED, *argv])
    run = build_run(cfg)
    rows = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    manager = Evaluator(run.cfg, run).manager
    prompts = [manager.encode_prompt(p) for p in run.source.eval_prompts()]
    prompts = (prompts * (2 * rows // max(len(prompts), 1) + 1))[: 2 * rows]
    params = SamplingParams(temperature=1.0, max_new_tokens=cfg.rollout.rollout_max_response_len)
    times: dict[int, list[float]] = {rows: [], 2 * rows: []}
    for _ in range(reps):
        for n in times:
            t = time.perf_counter()
            generate(run.gpt, prompts[:n], params, vocab_size=run.model_args.vocab_size)
            times[n].append(time.perf_counter() - t)
    platform.destroy()
    return statistics.median(times[2 * rows]) / statistics.median(times[rows])


def partial_bench(argv: list[str], steps: int, reps: int, only: str | None = None) -> None:
    from megatron_mtp_rl import platform

    modes = [m for m in PARTIAL_MODES if only is None or m[0] in only.split(",")]
    runs: dict[str, list[dict]] = {name: [] for name, _ in modes}
    for rep in range(reps):  # interleaved: every mode sees the machine's load alike
        for name, flags in modes if rep % 2 == 0 else modes[::-1]:
            runs[name].append(_partial_run(argv, flags, steps))
            platform.destroy()
    results = {}
    for name, rs in runs.items():  # the median step time; the rest is the same in every repetition
        results[name] = dict(
            rs[0],
            step_time=statistics.median(r["step_time"] for r in rs),
            wait_time=statistics.median(r["wait_time"] for r in rs),
        )
    base = results.get("wait for all", next(iter(results.values())))["step_time"]  # else: vs the first mode
    print(
        f"long-tailed arith ({' '.join(SKEWED + argv)}), {steps} steps timed per run (wall clock), "
        f"median of {reps} interleaved runs"
    )
    print(
        "mode         | step s | vs wait | waited s | gen tok/step | wasted tok/step | wasted % | trained len | "
        "lag histogram"
    )
    for name, r in results.items():
        hist = " ".join(f"{k}:{int(v)}" for k, v in sorted(r["lags"].items()))
        frac = r["wasted"] / max(r["generated"], 1e-9)
        print(
            f"{name:12s} | {r['step_time']:6.2f} | {r['step_time'] / base:6.2f}x | {r['wait_time']:8.2f} | "
            f"{r['generated']:12.1f} | "
            f"{r['wasted']:15.1f} | {100 * frac:7.1f}% | {r['response_len']:11.1f} | {hist}"
        )
    if "partial" in results:
        p = results["partial"]
        print(f"partial_vs_wait_step_time={p['step_time'] / base:.2f}")
        print(f"partial_wasted_fraction={p['wasted'] / max(p['generated'], 1e-9):.3f}")
    if "K=1" in results and "K=2" in results:
        print(f"k2_vs_k1_step_time={results['K=2']['step_time'] / results['K=1']['step_time']:.2f}")
        # one engine, generation the bottleneck: K = 2 could only gain by decoding two batches at once
        print(f"engine_two_batches_cost={_two_batches_cost(argv):.2f}")
    if "partial K=1" in results and "partial K=2" in results:
        ratio = results["partial K=2"]["step_time"] / results["partial K=1"]["step_time"]
        print(f"partial_k2_vs_k1_step_time={ratio:.2f}")


def main(argv: list[str] | None = None) -> None:
    from megatron_mtp_rl.cli import quiet_known_noise

    quiet_known_noise()
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions per cell (median reported)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--no-eos", action="store_true", help="generate max-new-tokens without stopping at EOS")
    ap.add_argument("--draft-depths", type=int, default=None, help="MTP depths drafted per round (default: all)")
    ap.add_argument("--skip-async", action="store_true", help="only the decoding part")
    ap.add_argument("--rl-steps", type=int, default=3, help="timed RL steps per run (after one warm-up step)")
    ap.add_argument("--rl-reps", type=int, default=2, help="(sync, async) run pairs (medians reported)")
    ap.add_argument("--partial-rollout", action="store_true", help="bench long generations (see above)")
    ap.add_argument("--modes", default=None, help="--partial-rollout: comma-separated subset of the modes")
    ap.add_argument("--partial-steps", type=int, default=10, help="--partial-rollout: RL steps per run, all timed")
    own, rest = ap.parse_known_args(argv)
    torch.set_num_threads(own.threads)
    if own.partial_rollout:
        partial_bench(rest, own.partial_steps, own.rl_reps, own.modes)
        return

    from megatron_mtp_rl import platform
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.train.builders import build_run
    from megatron_mtp_rl.train.loop import resume
    from megatron_mtp_rl.train.pretrain import Evaluator

    cfg = parse_config(["--quiet", "--finetune", *rest])
    run = build_run(cfg)
    resume(run.cfg, run)  # --load: weights only (--finetune)
    manager = Evaluator(run.cfg, run).manager
    prompts = [manager.encode_prompt(p) for p in run.source.eval_prompts()[:64]]
    vocab = run.tokenizer.vocab_size
    depths = run.model_args.mtp_num_layers
    rows, identical = _spec_bench(
        run,
        prompts,
        vocab,
        max_new=own.max_new_tokens,
        eos_id=None if own.no_eos else run.tokenizer.eos_id,
        reps=own.reps,
        draft_depths=own.draft_depths,
        batches=(1, 8, 64),
    )
    platform.destroy()
    if not own.skip_async:  # (sync, async) pairs, each a fresh run of the demo config; medians
        runs = {False: [], True: []}
        for _ in range(own.rl_reps):
            for mode in (False, True):
                runs[mode].append(_rl_steps_per_s(rest, own.rl_steps, async_rollout=mode))
                platform.destroy()
        sync, asyn = ([statistics.median(r[i] for r in runs[m]) for i in range(3)] for m in (False, True))
    print(
        f"{len(prompts)} held-out prompts, up to {own.max_new_tokens} new tokens "
        f"({'no EOS' if own.no_eos else 'stop at EOS'}), tokens per CPU-second of this process, "
        f"{own.draft_depths or depths} of {depths} MTP depths drafted, torch threads {torch.get_num_threads()}"
    )
    print("temperature | batch | tokens/s plain | tokens/s spec | spec/plain | accept len")
    for (temp, b), (p, s, acc) in rows.items():
        print(f"{temp:11.1f} | {b:5d} | {p:14.1f} | {s:13.1f} | {s / p:9.2f}x | {acc:10.2f}")
    print(f"greedy_identical={identical}")
    speedup_async = "n/a"
    if not own.skip_async:
        print(
            f"RL steps/s (wall clock, steps 2..{own.rl_steps + 1}): sync {sync[0]:.3f} (rollout {sync[1]:.2f} s + "
            f"train {sync[2]:.2f} s per step), async {asyn[0]:.3f} (rollout {asyn[1]:.2f} s in the "
            f"background, train {asyn[2]:.2f} s incl. waiting for it)"
        )
        # Overlap hides min(rollout, train) at best: the ceiling this config allows.
        print(f"async ceiling from the sync phases: {(sync[1] + sync[2]) / max(sync[1], sync[2]):.2f}x")
        speedup_async = f"{asyn[0] / sync[0]:.2f}"
    print(f"speedup_spec_b1={rows[(0.0, 1)][1] / rows[(0.0, 1)][0]:.2f}")
    print(f"speedup_spec_b64={rows[(0.0, 64)][1] / rows[(0.0, 64)][0]:.2f}")
    print(f"speedup_async={speedup_async}")


if __name__ == "__main__":
    main()
