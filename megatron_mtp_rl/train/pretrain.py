"""Warm start (``mtp-rl pretrain``): main + MTP cross-entropy on task solutions.

RL needs a policy that already solves some problems (non-zero reward) and MTP heads that
already draft; this trains both with supervised CE on ``prompt → answer<EOS>`` pairs of the
task, then saves a checkpoint that ``mtp-rl train --load DIR --finetune`` starts from.
"""

from __future__ import annotations

import time

import torch
from megatron.core import parallel_state

from megatron_mtp_rl.models import pack_sequences
from megatron_mtp_rl.rl.loss import step_denominators
from megatron_mtp_rl.train.arguments import parse_args
from megatron_mtp_rl.train.checkpoint import save_checkpoint
from megatron_mtp_rl.train.metrics import MetricsWriter, print_progress
from megatron_mtp_rl.train.optim import clip_grads
from megatron_mtp_rl.train.schedule import forward_backward
from megatron_mtp_rl.train.setup import build_run
from megatron_mtp_rl.train.step import reduce_metrics
from megatron_mtp_rl.train.trainer import Trainer, is_logging_rank

PRETRAIN_DEFAULTS = {
    "num_steps": 300,
    "lr": 1e-3,
    "global_batch_size": 64,
    "micro_batch_size": 64,
    "eval_interval": 25,
}
VALIDATION_OFFSET = 20_000_000  # validation problems: training distribution, never the held-out set
TRAIN_OFFSET = 10_000_000  # supervised problems: disjoint from the RL prompt stream


def parse_pretrain_args(argv: list[str] | None = None):
    """The train flags, with pretraining defaults for steps, LR and batch size."""

    def extend(parser):
        parser.set_defaults(**PRETRAIN_DEFAULTS)  # --config and the command line override these
        g = parser.add_argument_group("warm start")
        g.add_argument(
            "--stop-at-accuracy",
            type=float,
            help="stop once greedy accuracy on validation problems (training distribution) reaches this",
        )

    args = parse_args(argv, prog="mtp-rl pretrain", extend=extend)
    args.mtp_regime = "ce"
    return args


def ce_loss(den, mtp_weight: float):
    def fn(batch, out):
        main = -(out.logprobs * batch.loss_mask).sum() / max(den.main.tokens, 1.0)
        loss = main
        metrics = {"pretrain/main_ce": torch.stack([main.detach().double(), torch.zeros((), dtype=torch.float64)])}
        for k in range(out.num_depths):
            ce = -(out.mtp_logprobs[k] * out.mtp_mask[k]).sum() / max(den.mtp[k].tokens, 1.0)
            loss = loss + mtp_weight * ce
            metrics[f"pretrain/mtp_ce_{k + 1}"] = torch.stack(
                [ce.detach().double(), torch.zeros((), dtype=torch.float64)]
            )
        return loss, metrics

    return fn


def validation_accuracy(trainer: Trainer, n: int) -> float:
    """Greedy accuracy on ``n`` problems of the training distribution (not the held-out set)."""
    prompts = trainer.run.source.take(VALIDATION_OFFSET, n)
    return trainer.evaluate(prompts)["eval/accuracy"]


def run_pretrain(args) -> dict:
    run = build_run(args)
    trainer = Trainer(run)
    tok = run.tokenizer
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = args.global_batch_size // dp
    depths = run.model_args.mtp_num_layers or 0
    writer = MetricsWriter(args.metrics_jsonl, args.tensorboard_dir, enabled=is_logging_rank())
    t0 = time.perf_counter()
    last = {}
    for step in range(1, args.num_steps + 1):
        start = (step - 1) * args.global_batch_size + dp_rank * per_rank
        prompts = run.source.take(TRAIN_OFFSET + start, per_rank)
        seqs = [(trainer.manager.encode_prompt(p), tok.encode(str(p.label)) + [tok.eos_id]) for p in prompts]
        mbs = [
            pack_sequences(seqs[i : i + args.micro_batch_size], args.seq_length)[0]
            for i in range(0, len(seqs), args.micro_batch_size)
        ]
        den = step_denominators(mbs, depths, group=parallel_state.get_data_parallel_group())
        run.model.zero_grad_buffer()
        run.optimizer.zero_grad()
        res = forward_backward(run.model, mbs, ce_loss(den, 1.0 / max(depths, 1)), with_mtp=depths > 0)
        norms = clip_grads(run.model, args.clip_grad, args.clip_grad)
        run.optimizer.step()
        run.scheduler.step(increment=1)
        last = reduce_metrics(res, parallel_state.get_data_parallel_group()) if res else {}
        last["train/grad_norm"] = norms.main
        if args.stop_at_accuracy is not None and step % args.eval_interval == 0:
            last["pretrain/val_accuracy"] = validation_accuracy(trainer, 200)
            if last["pretrain/val_accuracy"] >= args.stop_at_accuracy:
                writer.log(step, last)
                if is_logging_rank() and not args.quiet:
                    print_progress(
                        f"pretrain step {step} | validation accuracy {last['pretrain/val_accuracy']:.3f} "
                        f"≥ --stop-at-accuracy {args.stop_at_accuracy}: stopping"
                    )
                break
        if step % 50 == 0 or step == args.num_steps:
            writer.log(step, last)
            if is_logging_rank() and not args.quiet:
                ce = " ".join(
                    f"{k.split('/')[1]} {v:.3f}" for k, v in sorted(last.items()) if k.startswith("pretrain/")
                )
                print_progress(f"pretrain step {step}/{args.num_steps} | {ce} | {time.perf_counter() - t0:.0f}s")
    ev = trainer.evaluate()
    if is_logging_rank() and not args.quiet and ev:
        print_progress(f"pretrain done | held-out accuracy {ev['eval/accuracy']:.3f}")
    writer.close()
    if args.save:
        trainer.step = 0
        save_checkpoint(
            args.save,
            args.num_steps,
            run.model,
            run.optimizer,
            trainer.trainer_state(),
            args.keep_last,
        )
    return {**last, **ev}
