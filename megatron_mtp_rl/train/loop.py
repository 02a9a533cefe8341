"""The RL training loop: build → resume → (rl_step, eval, save)* → close.

:func:`run_training` is what ``mtp-rl train`` runs; :func:`prepare` builds a ready
:class:`~megatron_mtp_rl.train.step.StepContext` for tools that drive steps themselves.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.cluster.colocated import generation_phase
from megatron_mtp_rl.config import RunConfig
from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.hf.directory import is_hf_dir
from megatron_mtp_rl.hf.load import load_hf
from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.platform.device import collective_device
from megatron_mtp_rl.rollout.async_rollout import OneStepAhead
from megatron_mtp_rl.rollout.dump import RolloutDumper
from megatron_mtp_rl.rollout.partial import PartialRollout
from megatron_mtp_rl.rollout.tokenizer import CHECKPOINT_TOKENIZER_DIR, copy_tokenizer_files
from megatron_mtp_rl.train.builders import (
    Run,
    build_advantage_estimator,
    build_engine,
    build_loss,
    build_reference,
    build_rollout,
    build_run,
    build_teacher,
    generation_depth,
)
from megatron_mtp_rl.train.checkpoint import latest_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from megatron_mtp_rl.train.critic import CRITIC_DIR, build_critic, init_critic
from megatron_mtp_rl.train.metrics import MetricsWriter, WandbSettings, print_progress, progress_line
from megatron_mtp_rl.train.release import release_graphs
from megatron_mtp_rl.train.run_lock import release_run
from megatron_mtp_rl.train.signals import GracefulStop, StopRequested
from megatron_mtp_rl.train.step import StepContext, on_mp_leader, rl_step


@dataclass
class LoopState:
    """Where the run is: RL steps done, and the position in the prompt stream."""

    step: int = 0
    cursor: int = 0
    pending: dict | None = None  # --async-rollout: the generated, not yet trained next batch
    partial: dict | None = None  # --partial-rollout: the buffer of unfinished samples


def is_logging_rank() -> bool:
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def run_training(cfg: RunConfig, *, rollout_actor=None, engines=None) -> list[dict]:
    """``mtp-rl train``: build everything, train, close; returns the metrics history."""
    ctx, state = prepare(cfg, rollout_actor=rollout_actor, engines=engines)
    try:
        return train(ctx, state)
    finally:
        close(ctx)


def prepare(cfg: RunConfig, *, rollout_actor=None, engines=None) -> tuple[StepContext, LoopState]:
    """Build the run, the KL reference, load ``--load``, then the engine (holding those weights)."""
    run = build_run(cfg)
    cfg = run.cfg  # device filled in
    reference = build_reference(cfg, run)
    critic = build_critic(cfg, run)
    state = resume(cfg, run)
    if critic is not None:
        where = init_critic(cfg, critic, run)
        if is_logging_rank() and not cfg.log.quiet:
            print_progress(f"critic: starts from {where}")
    engine = build_engine(cfg, run, rollout_actor=rollout_actor, engines=engines)
    rollout = build_rollout(cfg, run, engine)
    dumper = RolloutDumper(
        cfg.log.rollout_dump_dir, cfg.log.rollout_dump_n, enabled=is_logging_rank(), decode=run.tokenizer.decode
    )
    ctx = StepContext(cfg, run, engine, rollout, build_advantage_estimator(cfg), build_loss(cfg), reference, dumper)
    ctx.critic = critic
    ctx.teacher = build_teacher(cfg, run)
    ro = cfg.rollout
    depth = generation_depth(cfg)
    if depth:
        ctx.ahead = OneStepAhead(depth=depth)
        ctx.ahead.load_state_dict(state.pending)
    if ro.partial_rollout:
        over = (
            ro.over_sampling_batch_size or 2 * ro.rollout_batch_size
        ) // parallel_state.get_data_parallel_world_size()
        ctx.partial = PartialRollout(over, ro.max_off_policy_steps, ro.mask_offpolicy_in_partial_rollout)
        ctx.partial.load_state_dict(state.partial)
    return ctx, state


def close(ctx: StepContext) -> None:
    if ctx.ahead is not None:
        try:
            ctx.ahead.wait()  # never close the engine under a generating thread
        except Exception:
            pass
    ctx.rollout.close()
    ctx.engine.close()
    release_graphs(ctx.run.model, ctx.reference, ctx.critic, ctx.teacher)  # the model can be freed, groups and all
    release_run()


def train(ctx: StepContext, state: LoopState) -> list[dict]:
    """Evaluate at step 0, then RL steps with evaluation every ``--eval-interval`` and saves."""
    cfg, log = ctx.cfg, ctx.cfg.log
    writer = MetricsWriter(
        log.metrics_jsonl,
        log.tensorboard_dir,
        enabled=is_logging_rank(),
        resume_step=state.step,
        wandb=WandbSettings(log.wandb_project, log.wandb_run_name, log.wandb_mode, log.wandb_save_dir),
        run_config=asdict(cfg),
    )
    history = []
    first_step = state.step
    stop = GracefulStop(cfg.ckpt.exit_duration_in_mins).install()  # SIGTERM/SIGINT/time limit: save, exit
    try:
        if state.step == 0:
            m0 = evaluate(ctx)
            writer.log(0, m0)
            history.append({"step": 0, **m0})
            if not log.quiet and is_logging_rank() and m0:
                print_progress(f"step 0/{cfg.num_steps} | eval {m0['eval/accuracy']:.3f} (before RL)")
        while state.step < cfg.num_steps:
            m, state.cursor = rl_step(ctx, state.step + 1, state.cursor)
            state.step += 1
            if state.step % cfg.eval_interval == 0 or state.step == cfg.num_steps:
                m.update(evaluate(ctx))
            if _save_due(cfg, state.step):
                save(ctx, state)
            writer.log(state.step, m)
            history.append({"step": state.step, **m})
            if not log.quiet and is_logging_rank():
                print_progress(progress_line(state.step, cfg.num_steps, m, cfg.mtp.mtp_regime))
            if state.step < cfg.num_steps and stop.should_stop():  # collective: every rank stops here
                raise _stop_after_save(ctx, state, stop)
        if cfg.ckpt.save and (state.step > first_step or first_step == 0) and not _save_due(cfg, state.step):
            save(ctx, state)  # (a resumed run with nothing left to do rewrites nothing)
    finally:
        stop.restore()
        writer.close()
    return history


def _stop_after_save(ctx: StepContext, state: LoopState, stop: GracefulStop) -> StopRequested:
    """Save this step (even with --save-interval 0), say why in one line; the caller raises it."""
    c = ctx.cfg.ckpt
    saved = None
    if c.save:
        if not _save_due(ctx.cfg, state.step):
            save(ctx, state)
        saved = f"{c.save}/iter_{state.step:07d}"
    return stop.stop(state.step, ctx.cfg.num_steps, saved)


def _save_due(cfg: RunConfig, step: int) -> bool:
    c = cfg.ckpt
    return bool(c.save and c.save_interval and step % c.save_interval == 0)


# -- evaluation -------------------------------------------------------------------------------
def evaluate(ctx: StepContext, prompts=None) -> dict:
    """Greedy accuracy on the held-out prompts (or ``prompts``), split over DP ranks.

    With the off-policy queue running, the queued batches and weight pushes finish first: the engine then
    holds the weights just trained, as without the queue."""
    if ctx.ahead is not None:
        ctx.ahead.wait()
    return evaluate_accuracy(ctx.run, ctx.rollout.manager, ctx.engine, prompts)


def evaluate_accuracy(run: Run, manager, engine, prompts=None) -> dict:
    """Greedy accuracy with ``manager`` (one sample per prompt), reduced over DP."""
    prompts = run.source.eval_prompts() if prompts is None else prompts
    if not prompts:
        return {}
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    mine = prompts[dp_rank::dp]
    correct = 0.0
    with generation_phase(engine):  # colocated: the engines' turn on the GPUs (every rank enters)
        if mine:
            greedy = SamplingParams(
                temperature=0.0,
                max_new_tokens=manager.sampling.max_new_tokens,
                eos_id=manager.sampling.eos_id,
                stop_ids=manager.sampling.stop_ids,
            )

            def score():
                samples, _ = manager.generate_groups(mine, seed=0, params=greedy, n=1)
                return sum(float(s.reward >= 1.0 - 1e-6) for s in samples)

            correct = on_mp_leader(engine, score)
    dp_group = parallel_state.get_data_parallel_group()
    t = torch.tensor([correct, float(len(mine))], dtype=torch.float64, device=collective_device(dp_group))
    if dist.is_initialized() and dp > 1:
        dist.all_reduce(t, group=parallel_state.get_data_parallel_group())
    return {"eval/accuracy": float(t[0] / max(t[1], 1.0)), "eval/num_prompts": float(t[1])}


# -- checkpoints --------------------------------------------------------------------------------
def trainer_state(run: Run, state: LoopState) -> dict:
    """What a checkpoint holds besides model and optimizer shards."""
    return {
        "step": state.step,
        "cursor": state.cursor,
        "occ": _last_stage_occ_state(run),
        "scheduler": run.scheduler.state_dict(),
        "model_args": asdict(run.model_args),
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "mtp_regime": run.cfg.mtp.mtp_regime if run.cfg.command == "train" else "pretrain",
        "async_rollout": _per_rank(state.pending),
        "partial_rollout": _per_rank(state.partial),
    }


# Rank 0 writes trainer_state.pt; what differs between ranks is gathered into it first (collectives:
# every rank builds the trainer state).
def _last_stage_occ_state(run: Run) -> dict | None:
    """OCC's λ is measured and used where the loss is computed: the last pipeline stage's is the state."""
    state = run.occ.state_dict() if run.occ else None
    if state is None or parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return state
    group = parallel_state.get_pipeline_model_parallel_group()
    box = [state]
    dist.broadcast_object_list(box, src=dist.get_process_group_ranks(group)[-1], group=group)
    return box[0]


def _per_rank(pending: dict | None) -> dict | None:
    """--async-rollout: each data-parallel rank generated its own share of the next batch; keep every rank's."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return pending
    every: list = [None] * dist.get_world_size()
    dist.all_gather_object(every, pending)
    return {"per_rank": every}


def _my_pending(saved: dict | None) -> dict | None:
    """This rank's pending batch from a checkpoint; None (regenerated: one step of lag lost) when the
    checkpoint came from another world size."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    if not saved or "per_rank" not in saved:  # one process wrote it (or nothing was pending)
        return saved if world == 1 else None
    every = saved["per_rank"]
    if len(every) != world:
        if is_logging_rank():
            print_progress(f"--async-rollout: the checkpoint's pending batch is from {len(every)} ranks, this run "
                           f"has {world}: it is regenerated")  # fmt: skip
        return None
    return every[dist.get_rank() if dist.is_initialized() else 0]


def save(ctx: StepContext, state: LoopState) -> None:
    c, r = ctx.cfg.ckpt, ctx.run
    if ctx.ahead is not None:
        ctx.ahead.wait()
        state.pending = ctx.ahead.state_dict()
    if ctx.partial is not None:
        state.partial = ctx.partial.state_dict()
    parts = {CRITIC_DIR: (ctx.critic.model, ctx.critic.optimizer)} if ctx.critic is not None else None
    save_checkpoint(c.save, state.step, r.model, r.optimizer, trainer_state(r, state), c.keep_last, parts=parts)
    # the checkpoint carries its HF tokenizer, so --load of it needs no --tokenizer
    tok_dir = getattr(r.tokenizer, "path", None)
    if (
        tok_dir
        and (not dist.is_initialized() or dist.get_rank() == 0)
        and not (Path(c.save) / CHECKPOINT_TOKENIZER_DIR).exists()
    ):
        copy_tokenizer_files(tok_dir, Path(c.save) / CHECKPOINT_TOKENIZER_DIR)


def resume(cfg: RunConfig, run: Run) -> LoopState:
    """Load ``--load`` (weights; with optimizer, step, cursor, OCC, LR and RNG unless --finetune)."""
    c = cfg.ckpt
    if not c.load:
        return LoopState()
    if is_hf_dir(c.load):  # weights only; each rank reads only its slices of the safetensors shards
        report = load_hf(run.model, c.load)
        if is_logging_rank() and not cfg.log.quiet:
            print_progress(
                f"--load {c.load}: HF checkpoint, weights only ({report.tensors} tensors, "
                f"{report.bytes_read / 2**20:.1f} MiB read on this rank)"
            )
        return LoopState()
    path = latest_checkpoint(c.load)
    if path is None:
        raise ConfigError(f"--load {c.load}: no checkpoint there (no latest_checkpointed_iteration.txt)")
    saved_state = read_trainer_state(path)
    saved = saved_state["model_args"]
    mine = asdict(run.model_args)
    diff = {k: (saved.get(k), mine[k]) for k in mine if k != "seq_length" and saved.get(k, mine[k]) != mine[k]}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {v[0]} vs run {v[1]}" for k, v in sorted(diff.items()))
        raise ConfigError(f"--load {path}: the checkpoint has a different model shape ({lines})")
    # A warm start (pretrain) loaded by train, or an RL checkpoint by pretrain: its weights only.
    weights_only = c.finetune or _is_pretrain(saved_state) != (cfg.command == "pretrain")
    if weights_only and not c.finetune and is_logging_rank() and not cfg.log.quiet:
        what = "a pretrain (warm start)" if _is_pretrain(saved_state) else "an RL"
        print_progress(f"--load {path} is {what} checkpoint: loading its weights only, as with --finetune")
    # Saved before the policy's first update (step 0, --critic-warmup-steps): no Adam state to load, a fresh one is it.
    never_updated = saved_state.get("scheduler", {}).get("num_steps", 1) == 0
    try:
        _, saved_state = load_checkpoint(c.load, run.model, None if weights_only or never_updated else run.optimizer)
    except ValueError as e:
        if "parameter group" not in str(e):
            raise
        raise ConfigError(
            f"--load {path}: the checkpoint's optimizer parameter groups differ from this run's (changed "
            "--lr, --min-lr or --weight-decay?). Resume with the original values, or add --finetune to load "
            f"the weights only. megatron-core said: {str(e).splitlines()[0]}"
        ) from None
    if weights_only:
        return LoopState()
    run.scheduler.load_state_dict(saved_state["scheduler"])
    if run.occ and saved_state.get("occ"):
        run.occ.load_state_dict(saved_state["occ"])
    if saved_state.get("rng"):
        random.setstate(saved_state["rng"]["python"])
        np.random.set_state(saved_state["rng"]["numpy"])
        torch.set_rng_state(saved_state["rng"]["torch"])
    pending = _my_pending(saved_state.get("async_rollout"))
    partial = _my_pending(saved_state.get("partial_rollout"))
    return LoopState(step=saved_state["step"], cursor=saved_state["cursor"], pending=pending, partial=partial)


def _is_pretrain(trainer_state: dict) -> bool:
    return trainer_state.get("mtp_regime") == "pretrain"
