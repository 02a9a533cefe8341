"""Build everything a run needs from parsed flags: parallel state, data, model, optimizer."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, replace

from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mtp_rl import platform
from megatron_mtp_rl.models import build_model, get_preset
from megatron_mtp_rl.models.presets import ModelArgs
from megatron_mtp_rl.models.provider import padded_vocab_size
from megatron_mtp_rl.rl import OCCConfig, OCCEstimator, get_regime, zero_alignment_warning
from megatron_mtp_rl.rollout.data import ArithTask, FilePromptSource
from megatron_mtp_rl.rollout.rewards import load_reward_fn
from megatron_mtp_rl.rollout.tokenizer import build_tokenizer
from megatron_mtp_rl.train.optim import build_optimizer, wrap_ddp
from megatron_mtp_rl.train.step import attach_occ


class ConfigError(ValueError):
    """A flag combination that cannot work; the message says which flags and why."""


@dataclass
class Run:
    args: argparse.Namespace
    model_args: ModelArgs
    tokenizer: object
    source: object
    reward_fn: object
    gpt: object
    model: object
    optimizer: object
    scheduler: object
    occ: OCCEstimator | None


def warn(msg: str) -> None:
    """A start-up warning on stderr, once (global rank 0)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def model_args_from(args, vocab_size: int) -> ModelArgs:
    base = get_preset(args.preset)
    overrides = {
        k: getattr(args, k, None)
        for k in (
            "num_layers",
            "hidden_size",
            "num_attention_heads",
            "num_query_groups",
            "ffn_hidden_size",
            "mtp_num_layers",
            "moe_router_topk",
            "moe_ffn_hidden_size",
            "moe_aux_loss_coeff",
            "untie_embeddings_and_output_weights",
            "make_vocab_size_divisible_by",
            "init_method_std",
        )
    }
    overrides["num_experts"] = getattr(args, "num_experts", None) or None
    overrides["vocab_size"] = vocab_size
    overrides["seq_length"] = args.seq_length
    if getattr(args, "bf16", False):
        overrides["params_dtype"] = "bf16"
    out = base.with_overrides(**overrides)
    if getattr(args, "num_experts", None) == 0:  # --num-experts 0: a dense model
        out = replace(out, num_experts=None)
    return out


def validate(args, model_args: ModelArgs, world: int) -> list[str]:
    """Every problem with the configuration, one clear message each (empty list: fine).

    Runs before anything is built, so a bad launch fails in seconds with all its problems.
    """
    problems = []
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep, cp = args.expert_model_parallel_size, args.context_parallel_size
    if world % (tp * pp * cp):
        problems.append(
            f"the world size {world} is not divisible by TP×PP×CP = {tp}×{pp}×{cp} "
            "(--tensor-/--pipeline-/--context-parallel-size)"
        )
    dp = max(1, world // (tp * pp * cp))
    if model_args.num_attention_heads % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {model_args.num_attention_heads}"
        )
    groups = model_args.num_query_groups or model_args.num_attention_heads
    if groups % tp:
        problems.append(f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {groups}")
    try:
        padded_vocab_size(model_args, tp)
    except ValueError as e:
        problems.append(str(e))
    if model_args.num_experts and model_args.num_experts % ep:
        problems.append(f"--expert-model-parallel-size {ep} does not divide --num-experts {model_args.num_experts}")
    if model_args.num_experts and tp > 1:
        problems.append(
            f"MoE with --tensor-model-parallel-size {tp} needs sequence parallelism in megatron-core's training "
            "mode, which this build does not enable; shard the experts with --expert-model-parallel-size instead"
        )
    if ep > 1 and not model_args.num_experts:
        problems.append(f"--expert-model-parallel-size {ep} needs a MoE model (--num-experts)")
    if model_args.num_layers % pp:
        problems.append(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {model_args.num_layers}")
    if not args.prompt_data:
        longest = 1 + 2 * args.arith_digits + 2 + args.rollout_max_response_len
        if longest > args.seq_length:
            problems.append(
                f"--seq-length {args.seq_length} is shorter than the longest arith sample "
                f"({longest} tokens with --rollout-max-response-len {args.rollout_max_response_len})"
            )
    regime = get_regime(args.mtp_regime)
    if regime.runs_mtp and not model_args.mtp_num_layers:
        problems.append(f"--mtp-regime {args.mtp_regime} needs MTP layers: set --mtp-num-layers ≥ 1")
    if args.local_spec_decode and not model_args.mtp_num_layers:
        problems.append("--local-spec-decode drafts with the MTP layers: set --mtp-num-layers ≥ 1")
    samples = args.rollout_batch_size * args.n_samples_per_prompt
    if args.rollout_batch_size % dp:
        problems.append(
            f"--rollout-batch-size {args.rollout_batch_size} is not divisible by the data-parallel size {dp}"
        )
    if args.global_batch_size % dp:
        problems.append(f"--global-batch-size {args.global_batch_size} is not divisible by the data-parallel size {dp}")
    if samples % args.global_batch_size:
        problems.append(
            f"--global-batch-size {args.global_batch_size} does not divide the rollout batch "
            f"({args.rollout_batch_size} prompts × {args.n_samples_per_prompt} samples = {samples})"
        )
    if args.global_batch_size // max(dp, 1) % args.micro_batch_size and args.pipeline_model_parallel_size > 1:
        problems.append("with pipeline parallelism --micro-batch-size must divide --global-batch-size / DP")
    if args.pipeline_model_parallel_size > 1 and args.rollout_engine == "local":
        problems.append("the local rollout engine generates with PP=1 only; use --rollout-engine sglang for PP > 1")
    if args.context_parallel_size > 1:
        problems.append("--context-parallel-size > 1 is not supported by the RL forward yet")
    if args.n_samples_per_prompt < 2:
        problems.append("--n-samples-per-prompt must be ≥ 2 (group-normalised advantages)")
    if args.rollout_engine == "local" and (args.sglang_engine_flags or args.sglang_router_flags):
        problems.append("--sglang-* flags need --rollout-engine sglang")
    if args.local_spec_decode and args.rollout_engine != "local":
        problems.append("--local-spec-decode is for the local engine; SGLang drafts with --sglang-speculative-*")
    return problems


def build_run(args) -> Run:
    sizes = platform.ParallelSizes(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
    )
    tokenizer = build_tokenizer(args.tokenizer)
    model_args = model_args_from(args, tokenizer.vocab_size)
    problems = validate(args, model_args, int(os.environ.get("WORLD_SIZE", "1")))
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))
    platform.initialize(sizes, seed=args.seed)
    if args.prompt_data:
        source = FilePromptSource(
            args.prompt_data,
            input_key=args.input_key,
            label_key=args.label_key,
            seed=args.seed,
            template=args.prompt_template,
            max_prompt_tokens=args.seq_length - args.rollout_max_response_len - 1,
            tokenizer=tokenizer,
            on_bad_row=args.on_bad_row,
            eval_path=args.eval_data,
        )
    else:
        source = ArithTask(
            seed=args.seed,
            digits=args.arith_digits,
            ops=args.arith_ops,
            num_eval=args.num_eval_prompts,
        )
    reward_fn = load_reward_fn(args.reward_fn)
    gpt = build_model(model_args)
    model = wrap_ddp(gpt)
    optimizer = build_optimizer(
        model,
        lr=args.lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
    )
    steps_per_rollout = args.rollout_batch_size * args.n_samples_per_prompt // args.global_batch_size
    total_updates = max(1, args.num_steps * steps_per_rollout)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if args.lr_warmup_steps else args.lr,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_steps,
        lr_decay_steps=total_updates,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=total_updates,
        wd_incr_style="constant",
    )
    regime = get_regime(args.mtp_regime)
    occ = None
    if regime.runs_mtp and model_args.mtp_num_layers:
        occ = OCCEstimator(
            model_args.mtp_num_layers,
            OCCConfig(
                ratio=args.occ_ratio,
                eps=args.occ_eps,
                lo=args.occ_min,
                hi=args.occ_max,
                ema=args.occ_ema,
                init=args.occ_init,
                baseline=args.occ_baseline,
                reduce=args.occ_reduce,
            ),
            group=parallel_state.get_data_parallel_group(with_context_parallel=True),
        )
    attach_occ(model, occ)
    msg = zero_alignment_warning(
        regime=args.mtp_regime, reduce=args.occ_reduce, minibatches_per_rollout=steps_per_rollout
    )
    if msg:
        warn(msg)
    return Run(args, model_args, tokenizer, source, reward_fn, gpt, model, optimizer, scheduler, occ)
