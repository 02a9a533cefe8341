"""Metrics sinks: one JSON object per step (JSONL), TensorBoard scalars, Weights & Biases, a progress line."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from megatron_mtp_rl.errors import ConfigError

WANDB_MODES = ("online", "offline", "disabled")


@dataclass(frozen=True)
class WandbSettings:
    """``--wandb-project`` / ``--wandb-run-name`` / ``--wandb-mode`` / ``--wandb-save-dir`` (Megatron's names).

    Off unless a project is given (and the mode is not ``disabled``).
    """

    project: str | None = None
    run_name: str | None = None
    mode: str = "online"
    save_dir: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.project) and self.mode != "disabled"

    def check(self) -> None:
        """At start-up, before anything is built: the mode is known and ``wandb`` is importable."""
        if self.mode not in WANDB_MODES:
            raise ConfigError(f"--wandb-mode {self.mode!r}: expected one of {', '.join(WANDB_MODES)}")
        if not self.enabled:
            return
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "--wandb-project needs the 'wandb' package: pip install 'megatron-mtp-rl[wandb]' "
                "(or --wandb-mode disabled)"
            )


class WandbWriter:
    """The TensorBoard scalars, sent to W&B with the step; the run config as the W&B config."""

    def __init__(self, settings: WandbSettings, run_config: dict | None = None):
        import wandb

        kwargs = {"dir": settings.save_dir} if settings.save_dir else {}
        if settings.save_dir:
            Path(settings.save_dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=settings.project,
            name=settings.run_name,
            mode=settings.mode,
            config=run_config or {},
            **kwargs,
        )

    @property
    def dir(self) -> str:
        """The local run directory (``.../wandb/offline-run-*`` offline)."""
        return str(Path(self._run.dir).parent)

    def log(self, step: int, metrics: dict) -> None:
        scalars = {k: float(v) for k, v in metrics.items() if _is_scalar(v)}
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


def _is_scalar(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class MetricsWriter:
    """Writes on the logging rank only; ``log`` is a no-op elsewhere."""

    def __init__(
        self,
        jsonl: str | None,
        tensorboard_dir: str | None,
        *,
        enabled: bool,
        resume_step: int = 0,
        wandb: WandbSettings | None = None,
        run_config: dict | None = None,
    ):
        self.enabled = enabled
        self._f = None
        self._tb = None
        self.wandb = None
        if not enabled:
            return
        if wandb is not None and wandb.enabled:
            self.wandb = WandbWriter(wandb, run_config)
        if jsonl:
            # Append-only: earlier rows move aside, never truncated (jsonl_log.py).
            from megatron_mtp_rl.train.jsonl_log import open_metrics_jsonl

            self._f = open_metrics_jsonl(jsonl, resume_step)
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
        if self.wandb:
            self.wandb.log(step, metrics)

    def close(self) -> None:
        if self._f:
            self._f.close()
        if self._tb:
            self._tb.close()
        if self.wandb:
            self.wandb.close()
            self.wandb = None


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
    if "rollout/policy_lag" in m:  # --async-rollout, --max-off-policy-steps, --partial-rollout
        parts.append(f"lag {m['rollout/policy_lag']:.2f} (max {int(m.get('rollout/policy_lag_max', 0))})")
    if "rollout/buffer_size" in m:
        parts.append(f"buffer {int(m['rollout/buffer_size'])}")
    if m.get("rollout/stale_dropped"):
        parts.append(f"stale dropped {int(m['rollout/stale_dropped'])}")
    if m.get("rollout/reward_errors"):  # loud: a failing reward function otherwise trains on zeros
        parts.append(f"reward errors {int(m['rollout/reward_errors'])}")
    parts.append(f"{m.get('perf/step_time', 0.0):.1f}s/step")
    return " | ".join(parts)


def print_progress(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
