"""Command-line flags (Megatron-style names) and ``--config FILE.yaml`` whose keys are flag names."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from megatron_mtp_rl.models.presets import PRESETS
from megatron_mtp_rl.rl.occ import BASELINES, REDUCE_MODES
from megatron_mtp_rl.rl.policy_loss import AGG_MODES, KL_TYPES
from megatron_mtp_rl.rl.regimes import REGIMES

ALGORITHMS = {
    # Defaults each algorithm sets, unless the flag is given explicitly.
    "grpo": {},
    "dapo": {
        "eps_clip_high": 0.28,
        "loss_agg_mode": "token-mean",
        "dynamic_sampling": True,
        "overlong_buffer_len": 4,
    },
    "gspo": {
        "ratio_type": "sequence",
        "eps_clip": 3e-4,
        "eps_clip_high": 4e-4,
        "loss_agg_mode": "seq-mean-token-mean",
    },
}


def _model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (Megatron names; override the preset)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="tiny-moe", help="model shape preset")
    g.add_argument("--num-layers", type=int, help="transformer layers of the trunk")
    g.add_argument("--hidden-size", type=int, help="model width")
    g.add_argument("--num-attention-heads", type=int, help="attention heads")
    g.add_argument("--num-query-groups", type=int, help="GQA groups (default: heads)")
    g.add_argument("--ffn-hidden-size", type=int, help="MLP width")
    g.add_argument("--seq-length", type=int, default=64, help="tokens per packed row")
    g.add_argument("--mtp-num-layers", type=int, help="MTP depths D (preset: 2)")
    g.add_argument("--num-experts", type=int, help="MoE experts per layer (0 = dense)")
    g.add_argument("--moe-router-topk", type=int, help="experts per token")
    g.add_argument("--moe-ffn-hidden-size", type=int, help="expert MLP width")
    g.add_argument("--moe-aux-loss-coeff", type=float, help="load-balancing loss coefficient (0 = off)")
    g.add_argument(
        "--untie-embeddings-and-output-weights", action="store_true", default=None, help="separate output head"
    )
    g.add_argument(
        "--make-vocab-size-divisible-by", type=int, help="vocabulary padding multiple (TP must divide the padded size)"
    )
    g.add_argument("--init-method-std", type=float, help="weight init std")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters (GPU)")


def _parallel_flags(p):
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP size")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="PP size (MTP block on the last stage)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1, help="EP size")
    g.add_argument("--context-parallel-size", type=int, default=1, help="CP size (not supported by the RL forward yet)")


def _data_flags(p):
    g = p.add_argument_group("task and data")
    g.add_argument("--task", choices=["arith"], default="arith", help="built-in verifiable task")
    g.add_argument("--arith-digits", type=int, default=2, help="digits per operand of the arith task")
    g.add_argument("--arith-ops", default="+", help="operators drawn from '+-*'")
    g.add_argument("--prompt-data", help="JSONL or Parquet prompts (replaces --task)")
    g.add_argument("--eval-data", help="JSONL or Parquet held-out prompts for eval/accuracy")
    g.add_argument("--input-key", default="prompt", help="prompt field of each data row")
    g.add_argument("--label-key", default="label", help="answer field of each data row")
    g.add_argument("--prompt-template", default="{input}", help="format string around the input")
    g.add_argument(
        "--on-bad-row",
        choices=["fail", "skip"],
        default="fail",
        help="malformed data rows: stop with file:line, or skip and count",
    )
    g.add_argument("--tokenizer", help="arith | byte | hf:PATH (default: arith for the task, byte for files)")
    g.add_argument(
        "--reward-fn",
        help="exact_match | math_verify | module:function (default: exact_match for the task, math_verify for files)",
    )
    g.add_argument("--reward-workers", type=int, default=2, help="reward worker processes (0: in-process, no timeout)")
    g.add_argument("--reward-timeout", type=float, default=10.0, help="seconds per reward call before it scores 0")
    g.add_argument("--num-eval-prompts", type=int, default=200, help="held-out arith problems for eval/accuracy")


def _rollout_flags(p):
    g = p.add_argument_group("rollout")
    g.add_argument(
        "--rollout-engine",
        choices=["local", "sglang"],
        default="local",
        help="local = generate in-process with the training model",
    )
    g.add_argument("--rollout-batch-size", type=int, default=16, help="prompts per RL step")
    g.add_argument("--n-samples-per-prompt", type=int, default=8, help="samples per prompt (group size)")
    g.add_argument("--rollout-temperature", type=float, default=1.0, help="sampling temperature")
    g.add_argument("--rollout-top-p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--rollout-max-response-len", type=int, default=8, help="max generated tokens per sample")
    g.add_argument("--local-spec-decode", action="store_true", help="draft with the MTP layers (exact)")
    g.add_argument("--rollout-num-engines", type=int, default=1, help="SGLang engines (router in front when > 1)")
    g.add_argument("--rollout-engine-tp", type=int, default=1, help="tensor parallelism of each SGLang engine")
    g.add_argument("--rollout-base-port", type=int, default=30000, help="port of SGLang engine 0 (engine i: +10·i)")
    g.add_argument("--rollout-router-port", type=int, default=30100, help="sglang-router port")
    g.add_argument(
        "--rollout-host",
        default="127.0.0.1",
        help="address SGLang engines and router bind to and are reached at (multi-node: this node's IP)",
    )
    g.add_argument("--rollout-hf-dir", default=None, help="where HF exports for SGLang go (default <save or runs>/hf)")
    g.add_argument("--hf-flavour", choices=["deepseek_v3", "mimo"], default=None, help="HF naming SGLang loads")
    g.add_argument(
        "--weight-sync-mode", choices=["tensor", "distributed", "disk"], default="tensor", help="Megatron → SGLang"
    )
    g.add_argument("--update-weight-buffer-size", type=int, default=512 * 2**20, help="bytes per weight-sync bucket")
    g.add_argument("--rollout-server-cmd", default=None, help="SGLang server command prefix (tests: a fake)")
    g.add_argument("--rollout-router-cmd", default=None, help="sglang-router command prefix")
    g.add_argument("--rollout-startup-timeout", type=float, default=900.0, help="seconds for engines to come up")
    g.add_argument("--dynamic-sampling", action="store_true", default=None, help="DAPO: drop all-equal groups")
    g.add_argument(
        "--max-sampling-rounds", type=int, default=4, help="dynamic sampling: max generation rounds per step"
    )
    g.add_argument("--overlong-buffer-len", type=int, default=None, help="DAPO soft overlong penalty buffer")
    g.add_argument(
        "--overlong-penalty-factor", type=float, default=1.0, help="DAPO overlong penalty at the length limit"
    )


def _algo_flags(p):
    g = p.add_argument_group("RL algorithm")
    g.add_argument(
        "--algorithm",
        choices=sorted(ALGORITHMS),
        default="grpo",
        help="sets defaults: dapo = clip-higher + dynamic sampling + overlong shaping; gspo = sequence ratio",
    )
    g.add_argument(
        "--no-grpo-std-normalization", action="store_true", help="advantages r - mean (no division by the group std)"
    )
    g.add_argument("--eps-clip", type=float, default=None, help="PPO clip ε (default 0.2)")
    g.add_argument("--eps-clip-high", type=float, default=None, help="upper clip ε_high (DAPO clip-higher)")
    g.add_argument("--eps-clip-c", type=float, default=None, help="dual-clip constant (> 1)")
    g.add_argument(
        "--loss-agg-mode",
        choices=AGG_MODES,
        default=None,
        help="token-mean (default) | seq-mean-token-sum | seq-mean-token-mean",
    )
    g.add_argument("--ratio-type", choices=["token", "sequence"], default=None, help="sequence = GSPO")
    g.add_argument("--kl-coef", type=float, default=0.0, help="KL to the initial model (0 = off)")
    g.add_argument("--kl-type", choices=KL_TYPES, default="low-var-kl", help="KL estimator")
    g.add_argument("--entropy-coef", type=float, default=0.0, help="entropy bonus (never drops the MTP term)")
    g = p.add_argument_group("MTP and OCC")
    g.add_argument("--mtp-regime", choices=REGIMES, default="occ", help="how the MTP layers train during RL")
    g.add_argument("--mtp-loss-coef", type=float, default=0.1, help="fixed coefficient c (detach/ce/policy)")
    g.add_argument("--occ-ratio", type=float, default=0.1, help="ρ")
    g.add_argument("--occ-eps", type=float, default=1e-8, help="ε in λ = (ρ/D)·A/(V+ε)")
    g.add_argument("--occ-min", type=float, default=0.0, help="λ lower clamp")
    g.add_argument("--occ-max", type=float, default=1.0, help="λ upper clamp")
    g.add_argument("--occ-ema", type=float, default=0.0, help="EMA β of λ across steps")
    g.add_argument("--occ-init", type=float, default=None, help="first-step λ (default ρ/D)")
    g.add_argument(
        "--occ-baseline",
        choices=BASELINES,
        default="main_old",
        help="b in e = ℓ^k − b: main head's old log-prob, or the MTP head's own",
    )
    g.add_argument(
        "--occ-reduce",
        choices=REDUCE_MODES,
        default="global",
        help="global = all-reduce over DP before each step; local = per micro-batch (paper code)",
    )


def _optim_flags(p):
    g = p.add_argument_group("optimizer")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="final learning rate of linear/cosine decay")
    g.add_argument("--lr-warmup-steps", type=int, default=0, help="in optimizer steps")
    g.add_argument(
        "--lr-decay-style",
        choices=["constant", "linear", "cosine"],
        default="constant",
        help="LR schedule after warmup",
    )
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam β1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam β2")
    g.add_argument("--clip-grad", type=float, default=1.0, help="grad-norm clip of the main model")
    g.add_argument(
        "--clip-grad-mtp",
        type=float,
        default=None,
        help="clip of the MTP group (default --clip-grad)",
    )
    g.add_argument(
        "--global-batch-size",
        type=int,
        default=None,
        help="samples per optimizer step (default: rollout/2)",
    )
    g.add_argument("--micro-batch-size", type=int, default=16, help="samples per micro-batch")


def _run_flags(p):
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML file whose keys are flag names")
    g.add_argument("--num-steps", type=int, default=30, help="RL steps (rollout + updates)")
    g.add_argument("--seed", type=int, default=1234, help="seed of data, sampling and init")
    g.add_argument("--save", help="checkpoint directory")
    g.add_argument("--load", help="checkpoint directory to resume from")
    g.add_argument("--finetune", action="store_true", help="with --load: weights only, restart at step 0")
    g.add_argument("--save-interval", type=int, default=0, help="steps between checkpoints (0: at the end)")
    g.add_argument("--keep-last", type=int, default=2, help="checkpoints kept in --save")
    g.add_argument("--eval-interval", type=int, default=5, help="steps between held-out evaluations")
    g.add_argument("--metrics-jsonl", help="one JSON object per step")
    g.add_argument("--tensorboard-dir", help="TensorBoard event directory")
    g.add_argument("--quiet", action="store_true", help="no progress line")
    g = p.add_argument_group("Ray")
    g.add_argument("--ray", action="store_true", help="run trainer ranks and a rollout actor on Ray")
    g.add_argument("--ray-num-trainers", type=int, default=1, help="trainer actors (the torch.distributed world)")
    g.add_argument("--ray-gpus-per-trainer", type=int, default=0, choices=[0, 1], help="1 on GPU clusters")
    g.add_argument(
        "--ray-rollout-placement",
        choices=["colocated", "disaggregated"],
        default="colocated",
        help="rollout actor shares trainer rank 0's bundle, or gets its own",
    )


def build_parser(prog: str = "mtp-rl train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="RL with jointly trained MTP layers (OCC).")
    for add in (
        _model_flags,
        _parallel_flags,
        _data_flags,
        _rollout_flags,
        _algo_flags,
        _optim_flags,
        _run_flags,
    ):
        add(p)
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """Read the YAML config; unknown keys are errors that name the file and line."""
    text = Path(path).read_text(encoding="utf-8")
    node = yaml.compose(text)
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise SystemExit(f"{path}:1: expected a mapping of flag names to values")
    data = yaml.safe_load(text)
    dests = {a.dest for a in parser._actions}
    out = {}
    for key_node, _ in node.value:
        key = key_node.value
        dest = key.lstrip("-").replace("-", "_")
        if dest not in dests or dest == "config":
            raise SystemExit(
                f"{path}:{key_node.start_mark.line + 1}: unknown key {key!r} (not a flag of {parser.prog})"
            )
        out[dest] = data[key]
    return out


def parse_args(argv: list[str] | None = None, prog: str = "mtp-rl train", extend=None) -> argparse.Namespace:
    """Parse flags (``--config`` values first, command line over them); ``extend(parser)`` adds flags."""
    from megatron_mtp_rl.rollout.sglang_server import split_passthrough_args

    parser = build_parser(prog)
    if extend is not None:
        extend(parser)
    # --sglang-X v / --sglang-router-X v go to SGLang / the router verbatim (as --X v).
    engine_flags, router_flags, argv = split_passthrough_args(list(sys.argv[1:] if argv is None else argv))
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_config_defaults(parser, pre.config))
    args = parser.parse_args(argv)
    args.sglang_engine_flags, args.sglang_router_flags = engine_flags, router_flags
    for k, v in ALGORITHMS[args.algorithm].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.eps_clip is None:
        args.eps_clip = 0.2
    if args.loss_agg_mode is None:
        args.loss_agg_mode = "token-mean"
    if args.ratio_type is None:
        args.ratio_type = "token"
    if args.dynamic_sampling is None:
        args.dynamic_sampling = False
    if args.tokenizer is None:
        args.tokenizer = "byte" if args.prompt_data else "arith"
    if args.reward_fn is None:
        args.reward_fn = "math_verify" if args.prompt_data else "exact_match"
    if args.global_batch_size is None:
        args.global_batch_size = max(1, args.rollout_batch_size * args.n_samples_per_prompt // 2)
    return args
