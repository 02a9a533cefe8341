"""Compare the MTP regimes on the embedded task: same warm start, same budget, S seeds.

For each seed a warm start is trained once (``mtp-rl pretrain``) and shared by every regime;
then each (regime, seed) runs ``mtp-rl train`` for the same number of steps. Runs execute in
parallel processes (``--jobs``), each with its own metrics JSONL; a finished run (its JSONL
holds the last step) is not run again, so an interrupted comparison resumes where it stopped.
Outputs in ``--out``: ``results.md`` / ``results.json`` (final and best held-out accuracy,
mean ± std over seeds, draft acceptance), ``accuracy.png`` (held-out accuracy vs step, the
paper's Figure 1 analogue) and ``dynamics.png`` (A_k, V_k, λ_k / coefficient vs step,
Figures 2–3 analogue).

    .venv/bin/python tools/compare_regimes.py --out runs/compare --seeds 3 --num-steps 60

``--advantage-estimator grpo,gae,rloo`` runs every regime under each estimator (rows ``REGIME@ESTIMATOR``;
the default, ``grpo`` alone, keeps the plain regime names and run files).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Every row names its head loss: the base config (the demo's) may set one.
VARIANTS = {
    "none": ["--mtp-regime", "none", "--mtp-head-loss", "none"],
    "detach": ["--mtp-regime", "detach", "--mtp-head-loss", "none"],
    "ce": ["--mtp-regime", "ce", "--mtp-head-loss", "none"],
    "policy": ["--mtp-regime", "policy", "--mtp-head-loss", "none"],
    "occ": ["--mtp-regime", "occ", "--mtp-head-loss", "none"],
    "occ-local": ["--mtp-regime", "occ", "--occ-reduce", "local", "--mtp-head-loss", "none"],
    # the MTP-head objective beside a regime (trains the MTP layers only; coefficient --mtp-head-coef)
    "occ+head-ce": ["--mtp-regime", "occ", "--mtp-head-loss", "ce"],
    "occ+head-distill": ["--mtp-regime", "occ", "--mtp-head-loss", "distill"],
    "policy+head-distill": ["--mtp-regime", "policy", "--mtp-head-loss", "distill"],
}
DEFAULT_ROWS = ["detach", "ce", "policy", "occ", "occ+head-ce", "occ+head-distill", "policy+head-distill"]
ROOT = Path(__file__).resolve().parent.parent


def estimator_rows(regimes: list[str], estimators: list[str]) -> dict[str, list[str]]:
    """Row name → train flags: every regime under every estimator (``REGIME@ESTIMATOR``; plain names for grpo alone)."""
    if estimators == ["grpo"]:
        return {v: VARIANTS[v] for v in regimes}
    return {f"{v}@{e}": [*VARIANTS[v], "--advantage-estimator", e] for e in estimators for v in regimes}


def _cli() -> list[str]:
    return [sys.executable, "-m", "megatron_mtp_rl.cli"]


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a run killed mid-write: the rest is redone
    return rows


def is_complete(path: Path, num_steps: int) -> bool:
    rows = read_rows(path)
    return bool(rows) and rows[-1].get("step") == num_steps and "eval/accuracy" in rows[-1]


def run_jobs(jobs: list[tuple[str, list[str], Path]], parallel: int) -> None:
    """Run commands, ``parallel`` at a time; each logs to its own file. Fails loudly."""
    pending = list(jobs)
    running: list[tuple[str, subprocess.Popen, Path]] = []
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")
    }
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 2) // parallel))
    t0 = time.perf_counter()
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd, log = pending.pop(0)
            log.parent.mkdir(parents=True, exist_ok=True)
            fh = open(log, "w")
            running.append((name, subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT), log))
            print(f"[{time.perf_counter() - t0:6.0f}s] started {name}", flush=True)
        for item in list(running):
            name, proc, log = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    tail = "".join(log.read_text().splitlines(True)[-15:])
                    raise SystemExit(f"{name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
                print(f"[{time.perf_counter() - t0:6.0f}s] finished {name}", flush=True)
        time.sleep(0.5)


def summarize(out: Path, variants: list[str], seeds: list[int]) -> dict:
    table = {}
    for v in variants:
        finals, bests, accepts, accepts2, spec = [], [], [], [], []
        for s in seeds:
            rows = read_rows(out / f"{v}_seed{s}.jsonl")
            evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r and r["step"] > 0]
            if not evals:
                continue
            finals.append(evals[-1])
            bests.append(max(evals))
            for key, dest in (("mtp/accept_1", accepts), ("mtp/accept_2", accepts2)):
                acc = [r[key] for r in rows if key in r]
                if acc:
                    dest.append(acc[-1])
            sp = out / f"spec_{v}_seed{s}.json"
            if sp.exists():
                spec.append(json.loads(sp.read_text())["accept_len"])
        start = [read_rows(out / f"{v}_seed{s}.jsonl")[0].get("eval/accuracy") for s in seeds]
        table[v] = {
            "seeds": len(finals),
            "start": _ms([x for x in start if x is not None]),
            "final": _ms(finals),
            "best": _ms(bests),
            "accept_1": _ms(accepts) if accepts else None,
            "accept_2": _ms(accepts2) if accepts2 else None,
            "spec_accept_len": _ms(spec) if spec else None,
        }
    return table


def _ms(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return (float("nan"), float("nan"))
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def write_table(out: Path, table: dict, meta: dict) -> str:
    lines = [
        f"held-out accuracy (greedy, {meta['num_eval']} problems), mean ± std over {meta['seeds']} seed(s), "
        f"{meta['num_steps']} RL steps",
        "",
        "| regime | start | final | best | expected acceptance depth 1 (final) | depth 2 (final) "
        "| self-spec accept length |",
        "|---|---|---|---|---|---|---|",
    ]

    def cell(x, digits=3):
        return "—" if x is None else f"{x[0]:.{digits}f} ± {x[1]:.{digits}f}"

    for v, r in table.items():
        lines.append(
            f"| {v} | {r['start'][0]:.3f} | {cell(r['final'])} | {cell(r['best'])} | {cell(r.get('accept_1'))} | "
            f"{cell(r.get('accept_2'))} | {cell(r.get('spec_accept_len'), 2)} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"meta": meta, "table": table}, indent=1))
    return text


def plot(out: Path, variants: list[str], seeds: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for v in variants:
        per_seed = [
            {r["step"]: r["eval/accuracy"] for r in read_rows(out / f"{v}_seed{s}.jsonl") if "eval/accuracy" in r}
            for s in seeds
        ]
        steps = sorted(set.intersection(*[set(d) for d in per_seed])) if per_seed else []
        if steps:
            mean = [statistics.mean(d[t] for d in per_seed) for t in steps]
            ax.plot(steps, mean, marker="o", ms=3, label=v)
    ax.set_xlabel("RL step")
    ax.set_ylabel("held-out accuracy")
    ax.set_title("accuracy vs step (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    for v in variants:
        rows = read_rows(out / f"{v}_seed{seeds[0]}.jsonl")
        for ax, key in zip(axes, ("occ/alignment_1", "occ/variance_1", "coef")):
            xs, ys = [], []
            for r in rows:
                val = r.get(
                    "occ/lambda_1" if key == "coef" and v.startswith("occ") else "mtp/coef_1" if key == "coef" else key
                )
                if isinstance(val, (int, float)):
                    xs.append(r["step"])
                    ys.append(val)
            if xs:
                ax.plot(xs, ys, label=v)
    for ax, title in zip(axes, ("alignment proxy A_1", "variance proxy V_1", "λ_1 (occ) / coefficient c")):
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"MTP dynamics, seed {seeds[0]}")
    fig.tight_layout()
    fig.savefig(out / "dynamics.png", dpi=110)
    plt.close(fig)


def measure_spec(ckpt: str, config: str, dest: Path, prompts: int = 64, new_tokens: int = 16) -> None:
    """Self-speculative decoding (MTP drafts, exact verification) from ``ckpt``: mean tokens per
    verification round over ``prompts`` held-out prompts, temperature 1 (the rollouts' sampling)."""
    import torch

    from megatron_mtp_rl import platform
    from megatron_mtp_rl.cli import quiet_known_noise
    from megatron_mtp_rl.config import parse_config
    from megatron_mtp_rl.models.generation import SamplingParams, generate
    from megatron_mtp_rl.train.builders import build_run
    from megatron_mtp_rl.train.loop import resume
    from megatron_mtp_rl.train.pretrain import Evaluator

    quiet_known_noise()
    cfg = parse_config(["--config", config, "--quiet", "--load", ckpt, "--finetune", "--reward-workers", "0"])
    run = build_run(cfg)
    resume(run.cfg, run)
    ps = [Evaluator(run.cfg, run).manager.encode_prompt(p) for p in run.source.eval_prompts()[:prompts]]
    sp = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, eos_id=None)
    lens = []
    for i, p in enumerate(ps):  # one row per call: acceptance not limited by the batch
        out = generate(run.gpt, [p], sp, vocab_size=run.tokenizer.vocab_size,
                       generator=torch.Generator().manual_seed(i), speculative=True)  # fmt: skip
        lens.append(out.stats["accept_len"])
    platform.destroy()
    dest.write_text(json.dumps({"accept_len": statistics.mean(lens), "prompts": len(ps), "new_tokens": new_tokens}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--regimes", default=",".join(DEFAULT_ROWS), help=f"comma list from {list(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-steps", type=int, default=60)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--config", default=str(ROOT / "examples/tiny_cpu/demo.yaml"), help="train config")
    p.add_argument("--pretrain-config", default=str(ROOT / "examples/tiny_cpu/pretrain.yaml"))
    p.add_argument(
        "--advantage-estimator", default="grpo", help="comma list of estimators: every regime runs under each"
    )
    p.add_argument("--extra", default="", help="extra flags for every train run (quoted)")
    p.add_argument("--pretrain-extra", default="", help="extra flags for the warm starts (quoted)")
    p.add_argument(
        "--spec", action=argparse.BooleanOptionalAction, default=True,
        help="save each run's final checkpoint and measure its self-speculative accept length",
    )  # fmt: skip
    p.add_argument("--spec-prompts", type=int, default=64, help="held-out prompts for the accept length")
    p.add_argument("--measure-spec", default=None, help=argparse.SUPPRESS)  # internal: one checkpoint
    p.add_argument("--spec-json", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure_spec:
        measure_spec(a.measure_spec, a.config, Path(a.spec_json), prompts=a.spec_prompts)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in a.regimes.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown regime(s) {unknown}; choose from {list(VARIANTS)}")
    rows = estimator_rows(variants, [e.strip() for e in a.advantage_estimator.split(",") if e.strip()])
    variants = list(rows)
    seeds = [1234 + i for i in range(a.seeds)]
    extra = a.extra.split()

    warm = []
    for s in seeds:
        ws = out / f"warmstart_seed{s}"
        if not (ws / "latest_checkpointed_iteration.txt").exists():
            cmd = [*_cli(), "pretrain", "--config", a.pretrain_config, "--seed", str(s), "--save", str(ws), "--quiet"]
            cmd += a.pretrain_extra.split()
            warm.append((f"warmstart seed {s}", cmd, out / "logs" / f"warmstart_seed{s}.log"))
    run_jobs(warm, a.jobs)

    jobs = []
    for s in seeds:
        for v in variants:
            metrics = out / f"{v}_seed{s}.jsonl"
            if is_complete(metrics, a.num_steps):
                continue
            cmd = [
                *_cli(), "train", "--config", a.config, *rows[v], "--seed", str(s), "--num-steps", str(a.num_steps),
                "--load", str(out / f"warmstart_seed{s}"), "--finetune", "--metrics-jsonl", str(metrics), "--quiet",
                *extra,
            ]  # fmt: skip
            if a.spec:
                cmd += ["--save", str(out / "ckpt" / f"{v}_seed{s}")]
            jobs.append((f"{v} seed {s}", cmd, out / "logs" / f"{v}_seed{s}.log"))
    print(f"{len(jobs)} run(s) to do, {len(seeds) * len(variants) - len(jobs)} already complete")
    run_jobs(jobs, a.jobs)
    if a.spec:
        spec_jobs = []
        for s in seeds:
            for v in variants:
                ckpt, dest = out / "ckpt" / f"{v}_seed{s}", out / f"spec_{v}_seed{s}.json"
                if dest.exists() or not (ckpt / "latest_checkpointed_iteration.txt").exists():
                    continue
                cmd = [sys.executable, __file__, "--measure-spec", str(ckpt), "--config", a.config]
                cmd += ["--spec-json", str(dest), "--spec-prompts", str(a.spec_prompts)]
                spec_jobs.append((f"spec {v} seed {s}", cmd, out / "logs" / f"spec_{v}_{s}.log"))
        run_jobs(spec_jobs, a.jobs)

    table = summarize(out, variants, seeds)
    num_eval = next(
        (
            int(r["eval/num_prompts"])
            for r in read_rows(out / f"{variants[0]}_seed{seeds[0]}.jsonl")
            if "eval/num_prompts" in r
        ),
        0,
    )
    meta = {"seeds": len(seeds), "num_steps": a.num_steps, "num_eval": num_eval, "config": a.config, "extra": a.extra,
            "advantage_estimator": a.advantage_estimator}  # fmt: skip
    print(write_table(out, table, meta))
    plot(out, variants, seeds)
    print(f"{out / 'results.md'}\n{out / 'accuracy.png'}\n{out / 'dynamics.png'}")


if __name__ == "__main__":
    main()
