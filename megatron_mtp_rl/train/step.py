"""One optimizer step of RL: old log-probs pass, forward/backward, OCC reduce, clip, step."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.rl.loss import RLBatch, RLLoss, RLLossConfig, step_denominators
from megatron_mtp_rl.rl.occ import OCCEstimator
from megatron_mtp_rl.train import faults
from megatron_mtp_rl.train.optim import clip_grads
from megatron_mtp_rl.train.schedule import configure, forward_backward


def attach_occ(model: torch.nn.Module, occ: OCCEstimator | None) -> None:
    """Make megatron's ``finalize_model_grads_func`` run the OCC reducer once per step."""

    def hook(_chunks):
        if occ is not None and parallel_state.is_pipeline_last_stage():
            occ.reduce()

    configure(model, finalize_hook=hook)


@torch.no_grad()
def compute_old_logprobs(model, micro_batches: list[RLBatch], *, with_mtp: bool) -> None:
    """Fill ``old_logprobs`` (and ``old_mtp_logprobs``) with the current policy's scores."""
    was_training = model.training
    model.eval()
    outs = forward_backward(model, micro_batches, None, forward_only=True, with_mtp=with_mtp)
    model.train(was_training)
    if not parallel_state.is_pipeline_last_stage():
        return
    for batch, out in zip(micro_batches, outs):
        batch.old_logprobs = out.logprobs.detach()
        batch.old_mtp_logprobs = out.mtp_logprobs.detach() if out.mtp_logprobs is not None else None


def reduce_metrics(per_microbatch: list[dict], group=None) -> dict[str, float]:
    """Σ (sum, count) over micro-batches and DP ranks; value = sum/count (or sum if count=0)."""
    if not per_microbatch:
        return {}
    keys = sorted(per_microbatch[0])
    t = torch.stack([torch.stack([m[k] for m in per_microbatch]).sum(0) for k in keys]).double()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    out = {}
    for k, (s, c) in zip(keys, t.tolist()):
        out[k] = s / c if c > 0 else s
    return out


def _poisoned(loss_fn):
    """Fault injection: the same loss times NaN (gradients become NaN everywhere)."""

    def fn(batch, out):
        loss, metrics = loss_fn(batch, out)
        return loss * float("nan"), metrics

    fn.forward_kwargs = loss_fn.forward_kwargs
    return fn


def train_step(
    model,
    optimizer,
    micro_batches: list[RLBatch],
    loss_config: RLLossConfig,
    occ: OCCEstimator | None,
    *,
    clip_grad: float = 1.0,
    clip_grad_mtp: float | None = None,
    mtp_coef_override: list[float] | None = None,
) -> dict[str, float]:
    """Run one optimizer step over ``micro_batches`` (this rank's share of the mini-batch).

    Non-finite gradients skip ``optimizer.step()`` on every rank (grad norms are
    collective, so all ranks agree) and count ``train/skipped_steps``.
    """
    regime = loss_config.regime
    num_depths = (model.config.mtp_num_layers or 0) if regime.runs_mtp else 0
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    den = step_denominators(micro_batches, num_depths, group=dp_group)
    loss_fn = RLLoss(loss_config, den, occ, mtp_coef_override=mtp_coef_override)
    if faults.active("nan_loss"):
        loss_fn = _poisoned(loss_fn)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    results = forward_backward(model, micro_batches, loss_fn, **loss_fn.forward_kwargs())
    norms = clip_grads(model, clip_grad, clip_grad if clip_grad_mtp is None else clip_grad_mtp)
    skipped = not (math.isfinite(norms.main) and math.isfinite(norms.mtp))
    if not skipped:
        ok, _, _ = optimizer.step()
        skipped = not ok
    metrics: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage():
        metrics.update(reduce_metrics(results, dp_group))
        if occ is not None and regime.runs_mtp:
            metrics.update(occ.last)
    metrics["train/grad_norm"] = norms.main
    metrics["train/grad_norm_mtp"] = norms.mtp
    metrics["train/skipped_steps"] = float(skipped)
    return metrics
