"""Metrics sinks: one JSON object per step (JSONL), TensorBoard scalars, a progress line."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


class MetricsWriter:
    """Writes on the logging rank only; ``log`` is a no-op elsewhere."""

    def __init__(self, jsonl: str | None, tensorboard_dir: str | None, *, enabled: bool, resume_step: int = 0):
        self.enabled = enabled
        self._f = None
        self._tb = None
        if not enabled:
            return
        if jsonl:
            path = Path(jsonl)
            path.parent.mkdir(parents=True, exist_ok=True)
            if resume_step > 0 and path.exists():
                # Drop lines past the checkpoint so a resumed run does not duplicate steps.
                lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
                kept = [ln for ln in lines if json.loads(ln).get("step", 0) <= resume_step]
                path.write_text("".join(ln + "\n" for ln in kept))
                self._f = open(path, "a", encoding="utf-8")
            else:
                self._f = open(path, "w", encoding="utf-8")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(tensorboard_dir, purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in sorted(metrics.items())}}
        if self._f:
            self._f.write(json.dumps(row) + "\n")
            self._f.flush()
        if self._tb:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb:
            self._tb.close()


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN; null means "undefined this step"
    return v


def progress_line(step: int, total: int, m: dict, regime: str = "occ") -> str:
    lams = [m[k] for k in sorted(m) if k.startswith("occ/lambda_")]
    coefs = [m[k] for k in sorted(m) if k.startswith("mtp/coef_")]
    parts = [
        f"step {step}/{total}",
        f"reward {m.get('rollout/reward_mean', float('nan')):.3f}",
        f"acc {m.get('rollout/accuracy', float('nan')):.3f}",
    ]
    if "eval/accuracy" in m:
        parts.append(f"eval {m['eval/accuracy']:.3f}")
    # OCC: the current λ_k; fixed-coefficient regimes: the c they use (OCC's λ is only monitored).
    if regime == "occ" and lams:
        parts.append("λ " + ",".join(f"{x:.4f}" for x in lams))
    elif coefs:
        parts.append("c " + ",".join(f"{x:.3f}" for x in coefs))
    if "mtp/accept_1" in m:
        parts.append(f"accept₁ {m['mtp/accept_1']:.2f}")
    parts.append(f"{m.get('perf/step_time', 0.0):.1f}s/step")
    return " | ".join(parts)


def print_progress(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
