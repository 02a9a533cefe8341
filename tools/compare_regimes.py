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

VARIANTS = {
    "none": ["--mtp-regime", "none"],
    "detach": ["--mtp-regime", "detach"],
    "ce": ["--mtp-regime", "ce"],
    "policy": ["--mtp-regime", "policy"],
    "occ": ["--mtp-regime", "occ"],
    "occ-local": ["--mtp-regime", "occ", "--occ-reduce", "local"],
}
ROOT = Path(__file__).resolve().parent.parent


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
        finals, bests, accepts = [], [], []
        for s in seeds:
            rows = read_rows(out / f"{v}_seed{s}.jsonl")
            evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r and r["step"] > 0]
            if not evals:
                continue
            finals.append(evals[-1])
            bests.append(max(evals))
            acc = [r["mtp/accept_1"] for r in rows if "mtp/accept_1" in r]
            if acc:
                accepts.append(acc[-1])
        start = [read_rows(out / f"{v}_seed{s}.jsonl")[0].get("eval/accuracy") for s in seeds]
        table[v] = {
            "seeds": len(finals),
            "start": _ms([x for x in start if x is not None]),
            "final": _ms(finals),
            "best": _ms(bests),
            "accept_1": _ms(accepts) if accepts else None,
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
        "| regime | start | final | best | draft acceptance depth 1 (final) |",
        "|---|---|---|---|---|",
    ]
    for v, r in table.items():
        acc = "—" if r["accept_1"] is None else f"{r['accept_1'][0]:.3f} ± {r['accept_1'][1]:.3f}"
        lines.append(
            f"| {v} | {r['start'][0]:.3f} | {r['final'][0]:.3f} ± {r['final'][1]:.3f} | "
            f"{r['best'][0]:.3f} ± {r['best'][1]:.3f} | {acc} |"
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--regimes", default=",".join(VARIANTS), help=f"comma list from {list(VARIANTS)}")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--num-steps", type=int, default=60)
    p.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--config", default=str(ROOT / "examples/tiny_cpu/demo.yaml"), help="train config")
    p.add_argument("--pretrain-config", default=str(ROOT / "examples/tiny_cpu/pretrain.yaml"))
    p.add_argument("--extra", default="", help="extra flags for every train run (quoted)")
    p.add_argument("--pretrain-extra", default="", help="extra flags for the warm starts (quoted)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    variants = [v.strip() for v in a.regimes.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown regime(s) {unknown}; choose from {list(VARIANTS)}")
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
                *_cli(), "train", "--config", a.config, *VARIANTS[v], "--seed", str(s), "--num-steps", str(a.num_steps),
                "--load", str(out / f"warmstart_seed{s}"), "--finetune", "--metrics-jsonl", str(metrics), "--quiet",
                *extra,
            ]  # fmt: skip
            jobs.append((f"{v} seed {s}", cmd, out / "logs" / f"{v}_seed{s}.log"))
    print(f"{len(jobs)} run(s) to do, {len(seeds) * len(variants) - len(jobs)} already complete")
    run_jobs(jobs, a.jobs)

    table = summarize(out, variants, seeds)
    num_eval = next(
        (
            int(r["eval/num_prompts"])
            for r in read_rows(out / f"{variants[0]}_seed{seeds[0]}.jsonl")
            if "eval/num_prompts" in r
        ),
        0,
    )
    meta = {"seeds": len(seeds), "num_steps": a.num_steps, "num_eval": num_eval, "config": a.config, "extra": a.extra}
    print(write_table(out, table, meta))
    plot(out, variants, seeds)
    print(f"{out / 'results.md'}\n{out / 'accuracy.png'}\n{out / 'dynamics.png'}")


if __name__ == "__main__":
    main()
