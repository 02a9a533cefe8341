"""``mtp-rl heal``: re-train the MTP layers of an RL checkpoint on the policy's own rollouts.

After RL the MTP layers may have drifted from the policy they draft for (Nemotron-3 Super
heals them after RL). Here the trunk is frozen *by construction*: the only loss is the MTP
head objective (``--mtp-head-loss ce|distill``) on a detached MTP pass, so no main parameter
ever receives a gradient, the optimizer starts fresh (weights-only load, no weight decay) and
Adam's update of a parameter with zero gradient and zero moments is exactly 0. Each step
generates rollouts with the loaded policy (which heal cannot change), measures the draft's
expected acceptance on them *before* training on them, then updates the MTP layers.
Healing stops after ``--num-steps`` or when that acceptance's trend over the last
``--patience`` steps rises by less than ``--min-gain`` (``train/heal_stop.py``: robust to the
per-step rollout noise). Acceptance on a fixed held-out rollout batch is printed before and
after, per depth. The saved checkpoint is read back and its main parameters compared,
bit for bit, with the input's.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.config import RunConfig
from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.platform.device import collective_device
from megatron_mtp_rl.rl.head_loss import HeadOnlyLoss
from megatron_mtp_rl.rl.loss import step_denominators
from megatron_mtp_rl.train.checkpoint import load_checkpoint
from megatron_mtp_rl.train.heal_stop import TrendStop
from megatron_mtp_rl.train.loop import LoopState, close, is_logging_rank, prepare, save
from megatron_mtp_rl.train.metrics import MetricsWriter, WandbSettings, print_progress
from megatron_mtp_rl.train.microbatches import same_count_micro_batches
from megatron_mtp_rl.train.optim import clip_and_step
from megatron_mtp_rl.train.schedule import forward_backward
from megatron_mtp_rl.train.signals import GracefulStop
from megatron_mtp_rl.train.step import build_micro_batches, generate, reduce_metrics


def heal_config(cfg: RunConfig) -> RunConfig:
    """The run ``heal`` actually makes of the user's flags (one-line errors for missing ones)."""
    if not cfg.ckpt.load:
        raise ConfigError("mtp-rl heal needs --load (the RL checkpoint whose MTP layers to heal)")
    if not cfg.ckpt.save:
        raise ConfigError("mtp-rl heal needs --save (where the healed checkpoint goes)")
    if cfg.mtp.mtp_head_loss == "none":
        raise ConfigError("mtp-rl heal needs --mtp-head-loss ce or distill")
    # weights only; no policy/MTP regime term; no decay (it would move the frozen trunk)
    return cfg.replace(ckpt__finetune=True, mtp__mtp_regime="none", optim__weight_decay=0.0, algo__kl_coef=0.0)


def main_parameters(gpt: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unwrap(gpt).named_parameters() if not n.startswith("mtp.")}


def _mtp_parameters(gpt: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in unwrap(gpt).named_parameters() if n.startswith("mtp.")}


def digest(params: dict[str, torch.Tensor]) -> str:
    """sha256 over names and raw bytes: equal digests mean bit-identical parameters."""
    h = hashlib.sha256()
    for n in sorted(params):
        h.update(n.encode())
        h.update(params[n].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _rollout_batches(ctx, step: int, cursor: int):
    cfg = ctx.cfg
    batch, cursor = generate(ctx, step, cursor)
    samples = batch.samples
    pad_rows = cfg.parallel.pipeline_model_parallel_size > 1
    if cfg.optim.use_dynamic_batch_size:
        parts = [(samples, [0.0] * len(samples), list(range(len(samples))))]
        return same_count_micro_batches(parts, cfg.optim.max_tokens_per_gpu, equal_counts=pad_rows)[0], cursor
    mbs = build_micro_batches(samples, [0.0] * len(samples), cfg.optim.micro_batch_size, cfg.data.seq_length, pad_rows)
    return mbs, cursor


@torch.no_grad()
def acceptance(model, micro_batches, num_depths: int) -> list[float]:
    """Expected draft acceptance per depth (masked token mean over all DP ranks)."""
    was = model.training
    model.eval()
    outs = forward_backward(model, micro_batches, None, forward_only=True, with_mtp=True, with_draft_stats=True)
    model.train(was)
    if not parallel_state.is_pipeline_last_stage():
        return [float("nan")] * num_depths
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    t = torch.zeros(num_depths, 2, dtype=torch.float64, device=collective_device(group))
    for out in outs:
        for k in range(num_depths):
            m = out.mtp_mask[k].bool()
            t[k, 0] += out.mtp_accept[k][m].double().sum().to(t.device)
            t[k, 1] += m.sum().to(t.device)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return [float(s / c) if c > 0 else float("nan") for s, c in t.tolist()]


def heal_step(ctx, micro_batches, num_depths: int) -> dict:
    """One optimizer update of the MTP layers on ``micro_batches`` (metrics measured before it)."""
    cfg, run = ctx.cfg, ctx.run
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    den = step_denominators(micro_batches, num_depths, group=group)
    loss_fn = HeadOnlyLoss(cfg.mtp.mtp_head_loss, cfg.mtp.mtp_head_coef, den.mtp, cfg.algo.loss_agg_mode)
    run.model.zero_grad_buffer()
    run.optimizer.zero_grad()
    results = forward_backward(run.model, micro_batches, loss_fn, **loss_fn.forward_kwargs())
    op = cfg.optim
    ok, norms = clip_and_step(run.model, run.optimizer, op.clip_grad, op.clip_grad_mtp or op.clip_grad)
    metrics = reduce_metrics(results, group) if parallel_state.is_pipeline_last_stage() else {}
    metrics["train/grad_norm_mtp"] = norms.mtp
    metrics["train/skipped_steps"] = float(not ok)
    return metrics


def run_heal(cfg: RunConfig) -> dict:
    """``mtp-rl heal``; returns the per-step history, acceptance before/after and the digests."""
    cfg = heal_config(cfg)
    ctx, _ = prepare(cfg)
    try:
        return _heal(ctx)
    finally:
        close(ctx)


def _heal(ctx) -> dict:
    cfg, run = ctx.cfg, ctx.run
    num_depths = run.model_args.mtp_num_layers or 0
    if num_depths < 1:
        raise ConfigError(f"--load {cfg.ckpt.load}: the model has no MTP layers to heal")
    main_before = digest(main_parameters(run.gpt))
    mtp_before = digest(_mtp_parameters(run.gpt))
    held_out, cursor = _rollout_batches(ctx, 0, 0)
    before = acceptance(run.model, held_out, num_depths)
    log = cfg.log
    writer = MetricsWriter(
        log.metrics_jsonl,
        log.tensorboard_dir,
        enabled=is_logging_rank(),
        resume_step=0,
        wandb=WandbSettings(log.wandb_project, log.wandb_run_name, log.wandb_mode, log.wandb_save_dir),
        run_config=asdict(cfg),
    )
    history, step = [], 0
    plateau = TrendStop(cfg.mtp.heal_patience, cfg.mtp.heal_min_gain)
    # SIGTERM/SIGINT/--exit-duration-in-mins: stop healing after this step, save what is healed, exit.
    stop, stopped = GracefulStop(cfg.ckpt.exit_duration_in_mins).install(), False
    try:
        writer.log(0, {f"heal/held_out_accept_{k + 1}": a for k, a in enumerate(before)})
        while step < cfg.num_steps:
            step += 1
            mbs, cursor = _rollout_batches(ctx, step, cursor)
            m = heal_step(ctx, mbs, num_depths)
            writer.log(step, m)
            history.append({"step": step, **m})
            mean_acc = sum(m.get(f"mtp/accept_{k + 1}", 0.0) for k in range(num_depths)) / num_depths
            if not log.quiet and is_logging_rank():
                accs = " ".join(f"{m.get(f'mtp/accept_{k + 1}', float('nan')):.4f}" for k in range(num_depths))
                print_progress(f"heal {step}/{cfg.num_steps} | accept {accs} | head loss {m['train/loss']:.4f}")
            if plateau.update(mean_acc):
                break
            if step < cfg.num_steps and stop.should_stop():  # collective: every rank stops here
                stopped = True
                break
        after = acceptance(run.model, held_out, num_depths)
        writer.log(step + 1, {f"heal/held_out_accept_{k + 1}": a for k, a in enumerate(after)})
    finally:
        stop.restore()
        writer.close()
    main_now = digest(main_parameters(run.gpt))
    save(ctx, LoopState(step=step, cursor=cursor))
    # Read the saved checkpoint back: its main parameters must be the input's, bit for bit.
    load_checkpoint(cfg.ckpt.save, run.model)
    main_saved = digest(main_parameters(run.gpt))
    if not main_before == main_now == main_saved:
        raise RuntimeError("mtp-rl heal changed a main-model parameter (it must train the MTP layers only)")
    if is_logging_rank():
        for k in range(num_depths):
            print(f"heal: depth {k + 1} expected acceptance (held-out rollouts) {before[k]:.4f} -> {after[k]:.4f}")
        print(f"heal: {step} steps, main model unchanged (sha256 {main_saved[:16]}), saved to {cfg.ckpt.save}")
    if stopped:
        then = "it holds the MTP layers healed so far (heal it further with --load of it)"
        raise stop.stop(step, cfg.num_steps, f"{cfg.ckpt.save}/iter_{step:07d}", what="heal step", then=then)
    return {
        "history": history,
        "before": before,
        "after": after,
        "steps": step,
        "main_digest_input": main_before,
        "main_digest_saved": main_saved,
        "mtp_digest_input": mtp_before,
        "mtp_digest_saved": digest(_mtp_parameters(run.gpt)),
    }
