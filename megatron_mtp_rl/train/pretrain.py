"""Warm start (``mtp-rl pretrain``): main + MTP cross-entropy on task solutions.

RL needs a policy that already solves some problems (non-zero reward) and MTP heads that
already draft; this trains both with supervised CE on ``prompt → answer<EOS>`` pairs of the
task, then saves a checkpoint that ``mtp-rl train --load DIR --finetune`` starts from.
"""

from __future__ import annotations

import time

from megatron.core import parallel_state

from megatron_mtp_rl.config import RunConfig
from megatron_mtp_rl.models import pack_sequences
from megatron_mtp_rl.models.batch import supervised_mtp_mask
from megatron_mtp_rl.rl.loss import step_denominators
from megatron_mtp_rl.rl.metric_values import summed
from megatron_mtp_rl.rollout.local_engine import LocalEngine
from megatron_mtp_rl.rollout.manager import RolloutManager
from megatron_mtp_rl.rollout.reward_sandbox import build_scorer
from megatron_mtp_rl.train.builders import Run, build_run
from megatron_mtp_rl.train.checkpoint import save_checkpoint
from megatron_mtp_rl.train.loop import LoopState, evaluate_accuracy, is_logging_rank, resume, trainer_state
from megatron_mtp_rl.train.metrics import MetricsWriter, print_progress
from megatron_mtp_rl.train.optim import clip_and_step
from megatron_mtp_rl.train.schedule import forward_backward
from megatron_mtp_rl.train.signals import GracefulStop
from megatron_mtp_rl.train.step import reduce_metrics

# Its defaults (steps, LR, batch sizes) are the "pretrain" preset in config.py:COMMANDS.
VALIDATION_OFFSET = 20_000_000  # validation problems: training distribution, never the held-out set
TRAIN_OFFSET = 10_000_000  # supervised problems: disjoint from the RL prompt stream


def ce_loss(den, mtp_weight: float):
    """Main CE over the answer tokens; each MTP depth's CE over every answer token it can reach, from the
    prompt's positions too (:func:`~megatron_mtp_rl.models.batch.supervised_mtp_mask`): RL's rule (a draft
    only from an answer position) leaves depth k nothing to learn of the first k answer tokens, and on a
    short-answer task the warm start then took over 1,500 steps instead of ~600."""

    def fn(batch, out):
        main = -(out.logprobs * batch.loss_mask).sum() / max(den.main.tokens, 1.0)
        loss = main
        metrics = {"pretrain/main_ce": summed(main.detach())}
        for k in range(out.num_depths):
            mask = supervised_mtp_mask(batch, k + 1)
            ce = -(out.mtp_logprobs[k] * mask).sum() / max(den.mtp[k].tokens, 1.0)
            loss = loss + mtp_weight * ce
            metrics[f"pretrain/mtp_ce_{k + 1}"] = summed(ce.detach())
        return loss, metrics

    return fn


class Evaluator:
    """Greedy accuracy with the local engine and in-process scoring (no reward workers, no RL state)."""

    def __init__(self, cfg: RunConfig, run: Run):
        from megatron_mtp_rl.models.generation import SamplingParams

        self.run = run
        engine = LocalEngine(run.gpt, vocab_size=run.tokenizer.vocab_size, speculative=False)
        sampling = SamplingParams(max_new_tokens=cfg.rollout.rollout_max_response_len, eos_id=run.tokenizer.eos_id)
        scorer = build_scorer(cfg.rollout.reward_fn, workers=0, timeout_s=cfg.rollout.reward_timeout)
        self.engine = engine
        self.manager = RolloutManager(engine, run.tokenizer, scorer, n_samples=1, sampling=sampling)

    def __call__(self, prompts=None) -> dict:
        return evaluate_accuracy(self.run, self.manager, self.engine, prompts)


def validation_accuracy(evaluate: Evaluator, run: Run, n: int) -> float:
    """Greedy accuracy on ``n`` problems of the training distribution (not the held-out set)."""
    return evaluate(run.source.take(VALIDATION_OFFSET, n))["eval/accuracy"]


def run_pretrain(cfg: RunConfig) -> dict:
    """Supervised CE on ``prompt → answer<EOS>`` for main and MTP heads; non-finite steps skipped.

    Resumable like ``train``: ``--load`` (or a used ``--save``) continues from its step with
    its optimizer, LR and RNG (each step's problems depend only on the step number), and
    SIGTERM/SIGINT/``--exit-duration-in-mins`` finish the step, save and exit non-zero.
    """
    run = build_run(cfg)
    cfg = run.cfg
    first = resume(cfg, run).step
    evaluate = Evaluator(cfg, run)
    writer = MetricsWriter(cfg.log.metrics_jsonl, cfg.log.tensorboard_dir, enabled=is_logging_rank(), resume_step=first)
    if first and is_logging_rank() and not cfg.log.quiet:
        print_progress(f"pretrain: resumed at step {first}/{cfg.num_steps} from {cfg.ckpt.load}")
    stop = GracefulStop(cfg.ckpt.exit_duration_in_mins).install()
    try:
        last, step = _pretrain_steps(cfg, run, evaluate, writer, first, stop)
    finally:
        stop.restore()
        writer.close()
    ev = evaluate()
    if is_logging_rank() and not cfg.log.quiet and ev:
        print_progress(f"pretrain done | held-out accuracy {ev['eval/accuracy']:.3f}")
    if cfg.ckpt.save and step > first:  # (a resumed run with nothing left to do rewrites nothing)
        _save(cfg, run, cfg.num_steps)
    return {**last, **ev}


def _save(cfg: RunConfig, run: Run, step: int) -> str:
    state = trainer_state(run, LoopState(step=step))
    save_checkpoint(cfg.ckpt.save, step, run.model, run.optimizer, state, cfg.ckpt.keep_last)
    return f"{cfg.ckpt.save}/iter_{step:07d}"


def _pretrain_steps(cfg, run, evaluate, writer, first: int, stop: GracefulStop) -> tuple[dict, int]:
    """Steps ``first + 1 .. --num-steps`` (or until ``--stop-at-accuracy``); returns the last metrics and step."""
    tok = run.tokenizer
    op, log = cfg.optim, cfg.log
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_group = parallel_state.get_data_parallel_group()
    per_rank = op.global_batch_size // dp
    depths = run.model_args.mtp_num_layers or 0
    t0 = time.perf_counter()
    last, skipped, step = {}, 0, first
    for step in range(first + 1, cfg.num_steps + 1):
        start = (step - 1) * op.global_batch_size + dp_rank * per_rank
        prompts = run.source.take(TRAIN_OFFSET + start, per_rank)
        seqs = [(evaluate.manager.encode_prompt(p), tok.encode(str(p.label)) + [tok.eos_id]) for p in prompts]
        mbs = [
            pack_sequences(seqs[i : i + op.micro_batch_size], cfg.data.seq_length)[0]
            for i in range(0, len(seqs), op.micro_batch_size)
        ]
        den = step_denominators(mbs, depths, group=dp_group, mtp_mask=supervised_mtp_mask)
        run.model.zero_grad_buffer()
        run.optimizer.zero_grad()
        res = forward_backward(run.model, mbs, ce_loss(den, 1.0 / max(depths, 1)), with_mtp=depths > 0)
        # NaN/Inf gradients (norms are collective: every rank agrees) skip the update, as in RL;
        # the same clip-and-step as RL, so the distributed optimizer's shards are handled too.
        ok, norms = clip_and_step(run.model, run.optimizer, op.clip_grad, op.clip_grad)
        skipped += not ok
        run.scheduler.step(increment=1)
        last = reduce_metrics(res, dp_group) if res else {}
        last["train/grad_norm"] = norms.main
        last["train/skipped_steps"] = float(skipped)
        target = cfg.pretrain.stop_at_accuracy
        if target is not None and step % cfg.eval_interval == 0:
            last["pretrain/val_accuracy"] = validation_accuracy(evaluate, run, 200)
            if last["pretrain/val_accuracy"] >= target:
                writer.log(step, last)
                if is_logging_rank() and not log.quiet:
                    print_progress(
                        f"pretrain step {step} | validation accuracy {last['pretrain/val_accuracy']:.3f} "
                        f"≥ --stop-at-accuracy {target}: stopping"
                    )
                return last, step
        if step % 50 == 0 or step == cfg.num_steps:
            writer.log(step, last)
            if is_logging_rank() and not log.quiet:
                ce = " ".join(
                    f"{k.split('/')[1]} {v:.3f}" for k, v in sorted(last.items()) if k.startswith("pretrain/")
                )
                print_progress(f"pretrain step {step}/{cfg.num_steps} | {ce} | {time.perf_counter() - t0:.0f}s")
        if step < cfg.num_steps and stop.should_stop():  # collective: every rank stops after this step
            if step % 50:
                writer.log(step, last)
            raise stop.stop(step, cfg.num_steps, _save(cfg, run, step) if cfg.ckpt.save else None)
    return last, step
