"""Render a run's metrics JSONL to a PNG: reward/accuracy, λ_k, A_k, V_k and draft acceptance.

.venv/bin/python tools/plot_metrics.py runs/demo/metrics.jsonl -o runs/demo/plot.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def load_rows(path: str) -> list[dict]:
    rows = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}:{n}: not a JSON object ({e.msg})") from None
    if not rows:
        raise SystemExit(f"{path}: no metrics rows")
    return rows


def series(rows: list[dict], key: str):
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)):
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def keys_matching(rows: list[dict], pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return sorted({k for r in rows for k in r if rx.fullmatch(k)})


def plot(rows: list[dict], out: str, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward / accuracy", ["rollout/reward_mean", "rollout/accuracy", "eval/accuracy"]),
        ("OCC λ_k", keys_matching(rows, r"occ/lambda_\d+") or keys_matching(rows, r"mtp/coef_\d+")),
        ("alignment A_k", keys_matching(rows, r"occ/alignment_\d+")),
        ("variance V_k", keys_matching(rows, r"occ/variance_\d+")),
        ("draft acceptance", keys_matching(rows, r"mtp/accept_\d+") + keys_matching(rows, r"rollout/spec_accept_len")),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (name, keys) in zip(axes, panels):
        for k in keys:
            xs, ys = series(rows, k)
            if xs:
                ax.plot(xs, ys, marker="o" if k.startswith("eval/") else None, ms=3, label=k)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("metrics", help="metrics JSONL written by --metrics-jsonl")
    p.add_argument("-o", "--output", help="PNG path (default: next to the metrics, plot.png)")
    p.add_argument("--title")
    a = p.parse_args()
    out = a.output or str(Path(a.metrics).with_name("plot.png"))
    plot(load_rows(a.metrics), out, a.title)
    print(out)


if __name__ == "__main__":
    main()
