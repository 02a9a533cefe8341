"""The run's configuration: one frozen dataclass tree, built once from flags + YAML, validated once.

``RunConfig`` holds one section per concern (``cfg.model``, ``cfg.parallel``, ``cfg.data``,
``cfg.rollout``, ``cfg.algo``, ``cfg.mtp``, ``cfg.optim``, ``cfg.ckpt``, ``cfg.log``, ``cfg.ray``).
Every leaf is declared once with :func:`megatron_mtp_rl.flags.flag`; that declaration is the
command-line flag (``--field-name``), the ``--config FILE.yaml`` key, its type, default, choices
and range. argparse is generated from the fields; YAML values go through the same conversion
and checks. Precedence: field default < algorithm / command preset < YAML < command line.

The model section is generated from :class:`~megatron_mtp_rl.models.presets.ModelArgs`: every
``ModelArgs`` field not marked ``cli=False`` is a flag whose default ``None`` means "the preset
(or the checkpoint) decides"; :func:`resolve_model_args` turns it into the run's ``ModelArgs``.

Imports neither torch nor megatron: ``mtp-rl train --help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from dataclasses import dataclass, fields, make_dataclass, replace
from pathlib import Path

from megatron_mtp_rl.errors import ConfigError, print_user_error
from megatron_mtp_rl.flags import flag, flag_name, split_passthrough_args
from megatron_mtp_rl.hf.directory import is_hf_dir
from megatron_mtp_rl.models.presets import PRESETS, ModelArgs, from_checkpoint
from megatron_mtp_rl.train.saved_args import saved_model_args

# Choices mirrored from rl/ (which imports torch); tests/unit/test_config.py checks they agree.
REGIMES = ("none", "detach", "ce", "policy", "occ")
HEAD_LOSSES = ("none", "ce", "distill")  # rl/regimes.py:HEAD_LOSSES
AGG_MODES = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean")
KL_TYPES = ("k1", "k3", "low-var-kl")
# rl/advantages.py:ESTIMATORS
ADVANTAGE_ESTIMATORS = ("grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae", "opd")
OCC_BASELINES = ("main_old", "mtp_old")
CORRECTION_LEVELS = ("none", "token", "sequence", "geometric")  # rl/rollout_correction.py:LEVELS
OCC_REDUCE_MODES = ("global", "local")

# Algorithm presets: values each algorithm sets for the flags the user did not give (CLI or YAML).
ALGORITHMS: dict[str, dict] = {
    "grpo": {},
    "dapo": {"eps_clip_high": 0.28, "loss_agg_mode": "token-mean", "dynamic_sampling": True, "overlong_buffer_len": 4},
    "gspo": {"ratio_type": "sequence", "eps_clip": 3e-4, "eps_clip_high": 4e-4, "loss_agg_mode": "seq-mean-token-mean"},
}
# Command presets: ``mtp-rl pretrain`` trains longer, faster and with larger batches by default.
COMMANDS: dict[str, dict] = {
    "train": {},
    "pretrain": {"num_steps": 300, "lr": 1e-3, "global_batch_size": 64, "micro_batch_size": 64, "eval_interval": 25},
    "heal": {"num_steps": 50, "mtp_head_loss": "distill", "mtp_head_coef": 1.0},
}


def _strip_optional(tp):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


# -- sections -------------------------------------------------------------------------------
def _model_section() -> type:
    """``ModelConfig``: ``--preset`` and ``--bf16`` plus one optional flag per ``ModelArgs`` field."""
    hints = typing.get_type_hints(ModelArgs)
    spec = [
        ("preset", str, flag("tiny-moe", "model shape preset", choices=sorted(PRESETS))),
        ("bf16", bool, flag(False, "bf16 parameters (GPU)")),
    ]
    for f in fields(ModelArgs):
        if not f.metadata.get("cli", True):
            continue
        m = f.metadata
        spec.append(
            (
                f.name,
                typing.Optional[_strip_optional(hints[f.name])],  # noqa: UP045  (a runtime type object)
                flag(None, m.get("help", ""), choices=m.get("choices"), min=m.get("min"), name=m.get("name")),
            )
        )
    doc = "Model shape (Megatron names). ``None``: the preset or the loaded checkpoint decides."
    return make_dataclass("ModelConfig", spec, frozen=True, namespace={"__doc__": doc, "__module__": __name__})


ModelConfig = _model_section()


@dataclass(frozen=True)
class ParallelConfig:
    """Megatron parallel sizes (DP is the world size divided by TP×PP×CP) and megatron's memory and
    kernel options (distributed optimizer, sequence parallelism, recompute, Transformer Engine)."""

    tensor_model_parallel_size: int = flag(1, "TP size", min=1)
    pipeline_model_parallel_size: int = flag(1, "PP size (MTP block on the last stage)", min=1)
    expert_model_parallel_size: int = flag(1, "EP size", min=1)
    context_parallel_size: int = flag(1, "CP size (not supported by the RL forward yet)", min=1)
    distributed_timeout_minutes: float = flag(
        10.0,
        "a collective waiting longer ends the run, naming what it waited on (a hung peer); minutes, fractions allowed",
        min=0.0,
        min_exclusive=True,
    )
    use_distributed_optimizer: bool = flag(
        False, "shard fp32 master weights and Adam state over data-parallel ranks (ZeRO-1; GPU)"
    )
    sequence_parallel: bool = flag(
        False, "shard activations outside attention/MLP over TP ranks (GPU, Transformer Engine; MoE with TP > 1)"
    )
    transformer_impl: str | None = flag(
        None,
        "layer implementation: transformer_engine (fused/flash attention; default when TE and CUDA are present) "
        "| local (megatron-core's own; CPU)",
        choices=("transformer_engine", "local"),
    )
    recompute_granularity: str | None = flag(
        None,
        "activation recompute: full (whole layers) | selective (attention core only) (GPU)",
        choices=("full", "selective"),
    )
    recompute_method: str | None = flag(
        None,
        "with full recompute: uniform (every --recompute-num-layers layers) | block (the first N per stage)",
        choices=("uniform", "block"),
    )
    recompute_num_layers: int | None = flag(None, "layers per recompute unit (full recompute)", min=1)


@dataclass(frozen=True)
class DataConfig:
    """Prompts (built-in arith task, a JSONL/Parquet file, or a custom source) and the tokenizer."""

    data_source: str | None = flag(
        None,
        "prompt source: None = arith task (or --prompt-data when given), or module:function(cfg, tokenizer) "
        "returning a PromptSource (take(start, count), eval_prompts())",
    )
    seq_length: int = flag(64, "tokens per packed row", min=2)
    arith_digits: int = flag(2, "digits per operand of the arith task", min=1)
    arith_ops: str = flag("+", "operators drawn from '+-*'")
    arith_max_digits: int | None = flag(
        None,
        "long-tailed arith: operands of --arith-digits..this many digits, each length half as likely as the "
        "one below (with '*': answers of 1 to 2·this digits)",
        min=1,
    )
    num_eval_prompts: int = flag(200, "held-out arith problems for eval/accuracy (at most half of all)", min=0)
    prompt_data: str | None = flag(None, "JSONL, JSON-array or Parquet prompts (replaces the arith task)")
    eval_data: str | None = flag(None, "JSONL, JSON-array or Parquet held-out prompts for eval/accuracy")
    input_key: str = flag(
        "prompt", "prompt field of each row: a string or a list of {role, content} messages (dotted: a.b)"
    )
    label_key: str = flag("label", "answer field of each row (dotted: reward_model.ground_truth)")
    prompt_template: str = flag(
        "{input}",
        "text prompt from row fields: {input} (the --input-key value), {problem}, {extra_info.question}; "
        "other braces such as \\boxed{} stay literal",
    )
    on_bad_row: str = flag(
        "fail", "malformed data rows: stop with file:line, or skip and count", choices=["fail", "skip"]
    )
    tokenizer: str | None = flag(
        None,
        "arith | byte | a local HF tokenizer directory (also hf:DIR); default: the --load checkpoint's "
        "tokenizer/ when it has one, else arith for the task and byte for files",
    )
    stop_token_ids: str | None = flag(
        None, "comma-separated token ids that also end a response (besides the tokenizer's EOS ids)"
    )
    apply_chat_template: bool | None = flag(
        None,
        "format prompts with the tokenizer's chat template (default: on for message-list prompts when the "
        "tokenizer has one; a text prompt becomes one user message)",
    )
    system_prompt: str | None = flag(None, "system message put before each chat prompt (a row's own wins)")
    chat_template_kwargs: str | None = flag(
        None, "JSON object of chat-template variables, e.g. '{\"enable_thinking\": false}'"
    )


@dataclass(frozen=True)
class RolloutConfig:
    """Generation (engine, sampling), rewards, and the engine's weight sync."""

    rollout_engine: str = flag(
        "local", "local = generate in-process with the training model", choices=["local", "sglang"]
    )
    rollout_function: str | None = flag(
        None,
        "module:function(manager, fetch, *, num_prompts, seed, group_filter, max_rounds) -> RolloutBatch "
        "(default: RolloutManager.rollout)",
    )
    max_turns: int = flag(
        1, "multi-turn rollout functions (manager.max_turns): most model turns per sample, tool calls between", min=1
    )
    rollout_batch_size: int = flag(16, "prompts per RL step", min=1)
    n_samples_per_prompt: int = flag(8, "samples per prompt (group size)", min=1)
    rollout_temperature: float = flag(1.0, "sampling temperature", min=0)
    rollout_dtype: str | None = flag(
        None,
        "the engine's precision (local/process engines; SGLang: its --dtype); default: the trainer's",
        choices=["float32", "bfloat16"],
    )
    rollout_top_p: float = flag(1.0, "nucleus sampling", min=0, min_exclusive=True)
    rollout_max_response_len: int = flag(8, "max generated tokens per sample", min=1)
    local_spec_decode: bool = flag(False, "draft with the MTP layers (exact)")
    async_rollout: bool = flag(
        False,
        "generate step n+1 while step n trains (one step off-policy; the local engine runs in a child process)",
    )
    max_off_policy_steps: int | None = flag(
        None,
        "bounded staleness: generation runs up to K weight versions ahead of training (1 = --async-rollout); "
        "a sample older than K versions when it would train is dropped; K > 1 weights the loss by π_old/π_rollout",
        min=1,
    )
    partial_rollout: bool = flag(
        False,
        "stop a step's generation once --rollout-batch-size groups are complete; unfinished samples continue "
        "next step with the new weights",
    )
    over_sampling_batch_size: int | None = flag(
        None, "--partial-rollout: groups in flight per step (≥ --rollout-batch-size; default: 2×)", min=1
    )
    mask_offpolicy_in_partial_rollout: bool = flag(
        False, "--partial-rollout: no loss on tokens generated by weights older than the step's"
    )
    reward_fn: str | None = flag(
        None, "exact_match | math_verify | module:function (default: exact_match for arith, math_verify for files)"
    )
    reward_workers: int = flag(2, "reward worker processes (0: in-process, no timeout)", min=0)
    reward_timeout: float = flag(10.0, "seconds per reward call before it scores 0", min=0, min_exclusive=True)
    rollout_num_engines: int = flag(1, "SGLang engines (router in front when > 1)", min=1)
    rollout_engine_tp: int = flag(1, "tensor parallelism of each SGLang engine", min=1)
    rollout_base_port: int = flag(30000, "port of SGLang engine 0 (engine i: +10·i)", min=1)
    rollout_router_port: int = flag(30100, "sglang-router port", min=1)
    rollout_host: str = flag(
        "127.0.0.1", "address SGLang engines and router bind to and are reached at (multi-node: this node's IP)"
    )
    rollout_hf_dir: str | None = flag(None, "where HF exports for SGLang go (default <save or runs>/hf)")
    hf_flavour: str | None = flag(
        None,
        "HF family SGLang loads (hf/families; default: the model's own, tiny-dense mimo, tiny-moe glm4_moe)",
        choices=["deepseek_v3", "glm4_moe", "mimo", "qwen3", "qwen3_moe"],
    )
    weight_sync_mode: str = flag("tensor", "Megatron → SGLang", choices=["tensor", "distributed", "disk"])
    update_weight_buffer_size: int = flag(512 * 2**20, "bytes per weight-sync bucket", min=1)
    max_shard_size: str = flag("5GB", "largest safetensors shard an HF export writes (HF's spelling: 5GB, 500MB)")
    rollout_server_cmd: str | None = flag(None, "SGLang server command prefix (tests: a fake)")
    rollout_engine_urls: str | None = flag(
        None,
        "SGLang servers started elsewhere: engine URLs, or one router URL, comma-separated (nothing is started)",
    )
    rollout_router_cmd: str | None = flag(None, "sglang-router command prefix")
    rollout_startup_timeout: float = flag(900.0, "seconds for engines to come up", min=0, min_exclusive=True)
    rollout_version_timeout: float = flag(
        600.0,
        "seconds a generate request waits for the weights it expects (the trainer's last push) before failing",
        min=0,
        min_exclusive=True,
    )
    sglang_engine_flags: tuple = flag(
        (), "--sglang-X v given on the command line, passed to SGLang as --X v", cli=False
    )
    sglang_router_flags: tuple = flag((), "--sglang-router-X v, passed to the router as --X v", cli=False)


@dataclass(frozen=True)
class AlgoConfig:
    """The RL algorithm: advantages, group filter, clipped surrogate, KL and entropy terms."""

    algorithm: str = flag(
        "grpo",
        "sets defaults: dapo = clip-higher + dynamic sampling + overlong shaping; gspo = sequence ratio",
        choices=sorted(ALGORITHMS),
    )
    advantage_estimator: str = flag(
        "grpo",
        f"{' | '.join(ADVANTAGE_ESTIMATORS)} | module:NAME: an rl.advantages.Estimator (per-token advantages) "
        "or a function(rewards, group_size, cfg.algo) -> per-sample advantages",
    )
    gamma: float = flag(1.0, "discount γ of token-level returns (reinforce_plus_plus, gae)", min=0)
    lam: float = flag(1.0, "GAE λ (gae)", min=0)
    opd_coef: float = flag(0.0, "opd: weight of the outcome (GRPO) advantage added to the teacher's", min=0)
    no_grpo_std_normalization: bool = flag(False, "advantages r - mean (no division by the group std)")
    dynamic_sampling: bool = flag(False, "drop groups the --dynamic-sampling-filter rejects (DAPO)")
    dynamic_sampling_filter: str = flag(
        "megatron_mtp_rl.rl.advantages:dynamic_sampling_mask",
        "module:function(rewards, group_size) -> per-sample keep mask (default: DAPO, drop all-equal groups)",
    )
    max_sampling_rounds: int = flag(4, "dynamic sampling: max generation rounds per step", min=1)
    overlong_buffer_len: int | None = flag(None, "DAPO soft overlong penalty buffer (tokens)", min=1)
    overlong_penalty_factor: float = flag(1.0, "DAPO overlong penalty at the length limit", min=0)
    eps_clip: float = flag(0.2, "PPO clip ε", min=0)
    eps_clip_high: float | None = flag(None, "upper clip ε_high (DAPO clip-higher; default ε)", min=0)
    eps_clip_c: float | None = flag(None, "dual-clip constant (> 1)", min=1, min_exclusive=True)
    loss_agg_mode: str = flag("token-mean", "how token losses are averaged", choices=AGG_MODES)
    ratio_type: str = flag("token", "sequence = GSPO", choices=["token", "sequence"])
    kl_coef: float = flag(0.0, "KL to the reference model (0 = off; needs --ref-load or --load)", min=0)
    kl_type: str = flag("low-var-kl", "KL estimator", choices=KL_TYPES)
    entropy_coef: float = flag(0.0, "entropy bonus (never drops the MTP term)", min=0)
    tis_cap: float | None = flag(
        None,
        "truncated importance sampling: weight each token's policy loss by min(π_old/π_rollout, C) "
        "with the engine's log-probs (slime/veRL TIS); off by default",
        min=0,
        min_exclusive=True,
    )
    rollout_is: str = flag(
        "none",
        "rollout importance weights min(r, --rollout-is-cap), r = π_old/π_rollout per token, per sequence (∏) "
        "or its geometric mean (rl/rollout_correction.py); none with a cap = token",
        choices=CORRECTION_LEVELS,
    )
    rollout_is_cap: float | None = flag(
        None,
        "truncation C of the importance weight π_old/π_rollout: at the --rollout-is level; alone (or with "
        "--max-off-policy-steps > 1) per token, min(π_old/π_rollout, C) on each token's policy loss (the clip "
        "stays around π_old)",
        min=0,
        min_exclusive=True,
    )
    rollout_rs: str = flag(
        "none",
        "rollout rejection: drop tokens / sequences whose r is outside --rollout-rs-bounds",
        choices=CORRECTION_LEVELS,
    )
    rollout_rs_bounds: str | None = flag(None, "LOW,HIGH of --rollout-rs, e.g. 0.5,2")
    rollout_veto_threshold: float | None = flag(
        None,
        "drop every sequence with a token ratio π_old/π_rollout below T (catastrophic tokens)",
        min=0,
        min_exclusive=True,
    )
    use_rollout_routing_replay: bool = flag(
        False, "R3: the trainer's MoE layers use the experts the engine chose for each token (MTP layers route live)"
    )
    use_routing_replay: bool = flag(
        False, "R2: the update passes use the experts the old-logprob pass chose (MTP layers route live)"
    )
    value_clip: float = flag(
        0.2, "gae: clip of the critic's value change per update, around the values the advantages used (0 = off)", min=0
    )
    critic_warmup_steps: int = flag(0, "gae: RL steps that train only the critic (the policy is not updated)", min=0)


@dataclass(frozen=True)
class MTPConfig:
    """How the MTP layers train during RL (``--mtp-regime``) and OCC's λ."""

    mtp_regime: str = flag("occ", "how the MTP layers train during RL", choices=REGIMES)
    mtp_loss_coef: float = flag(0.1, "fixed coefficient c (detach/ce/policy)", min=0)
    mtp_head_loss: str = flag(
        "none",
        "MTP-layers-only objective beside the regime (trunk, embeddings, output head detached on its path): "
        "ce = CE on rollout tokens (detach ≡ none + ce), distill = KL(p_main ‖ q_k), p_main detached",
        choices=HEAD_LOSSES,
    )
    mtp_head_coef: float = flag(0.1, "coefficient of --mtp-head-loss", min=0)
    heal_patience: int = flag(
        20,
        "mtp-rl heal: the window, in steps, of the acceptance trend that decides when to stop (a least-squares "
        "line through the last P per-step acceptances: robust to their rollout noise); never stops before P steps",
        min=2,
        name="--patience",
    )
    heal_min_gain: float = flag(
        0.005, "mtp-rl heal: stop when the trend's rise across the --patience window is below this", name="--min-gain"
    )
    occ_ratio: float = flag(0.1, "ρ", min=0)
    occ_eps: float = flag(1e-8, "ε in λ = (ρ/D)·A/(V+ε)", min=0, min_exclusive=True)
    occ_min: float = flag(0.0, "λ lower clamp")
    occ_max: float = flag(1.0, "λ upper clamp")
    occ_ema: float = flag(0.0, "EMA β of λ across steps, in [0, 1)", min=0)
    occ_init: float | None = flag(None, "first-step λ (default ρ/D)")
    occ_baseline: str = flag(
        "main_old", "b in e = ℓ^k − b: main head's old log-prob, or the MTP head's own", choices=OCC_BASELINES
    )
    occ_reduce: str = flag(
        "global",
        "global = all-reduce over DP before each step; local = per micro-batch (paper code)",
        choices=OCC_REDUCE_MODES,
    )


@dataclass(frozen=True)
class OptimConfig:
    """Adam, LR schedule, clipping and batch sizes of the update phase."""

    lr: float = flag(1e-4, "peak learning rate", min=0)
    min_lr: float = flag(0.0, "final learning rate of linear/cosine decay", min=0)
    lr_warmup_steps: int = flag(0, "in optimizer steps", min=0)
    lr_decay_style: str = flag("constant", "LR schedule after warmup", choices=["constant", "linear", "cosine"])
    weight_decay: float = flag(0.0, "AdamW weight decay", min=0)
    adam_beta1: float = flag(0.9, "Adam β1", min=0)
    adam_beta2: float = flag(0.999, "Adam β2", min=0)
    clip_grad: float = flag(1.0, "grad-norm clip of the main model (0 = off)", min=0)
    clip_grad_mtp: float | None = flag(None, "clip of the MTP group (default --clip-grad)", min=0)
    global_batch_size: int | None = flag(None, "samples per optimizer step (default: rollout samples / 2)", min=1)
    micro_batch_size: int = flag(16, "samples per micro-batch", min=1)
    use_dynamic_batch_size: bool = flag(
        False, "form micro-batches by tokens (at most --max-tokens-per-gpu each), not --micro-batch-size samples"
    )
    max_tokens_per_gpu: int | None = flag(None, "tokens per micro-batch with --use-dynamic-batch-size", min=1)
    balance_data: bool | None = flag(
        None, "deal each update's samples to the DP ranks by tokens (default: on with --use-dynamic-batch-size)"
    )
    critic_lr: float | None = flag(None, "gae: the critic's (constant) learning rate (default --lr)", min=0)


@dataclass(frozen=True)
class CheckpointConfig:
    """Where checkpoints go and come from (megatron dist checkpoints)."""

    save: str | None = flag(None, "checkpoint directory")
    load: str | None = flag(None, "checkpoint directory to resume from")
    finetune: bool = flag(False, "with --load: weights only, restart at step 0")
    ref_load: str | None = flag(None, "checkpoint of the KL reference model (default: --load)")
    critic_load: str | None = flag(
        None, "gae: the critic's start: a run's checkpoint with a critic, or a policy checkpoint (default: the policy)"
    )
    teacher_load: str | None = flag(
        None, "checkpoint of the on-policy distillation teacher (--advantage-estimator opd); its own shape, same vocab"
    )
    save_interval: int = flag(0, "steps between checkpoints (0: at the end)", min=0)
    keep_last: int = flag(2, "checkpoints kept in --save (0: all)", min=0)
    no_auto_resume: bool = flag(False, "a --save holding checkpoints, without --load: refuse instead of resuming it")
    exit_duration_in_mins: float | None = flag(
        None, "stop after this wall-clock time: finish the step, save, exit 3 (SIGTERM/SIGINT: exit 128+N)",
        min=0, min_exclusive=True,
    )  # fmt: skip


@dataclass(frozen=True)
class LogConfig:
    """Metrics sinks and the progress line."""

    metrics_jsonl: str | None = flag(None, "one JSON object per step")
    tensorboard_dir: str | None = flag(None, "TensorBoard event directory")
    wandb_project: str | None = flag(None, "Weights & Biases project (W&B is off without it; extra 'wandb')")
    wandb_run_name: str | None = flag(None, "W&B run name")
    wandb_mode: str = flag("online", "W&B mode", choices=["online", "offline", "disabled"])
    wandb_save_dir: str | None = flag(None, "W&B local directory (default: ./wandb)")
    rollout_dump_dir: str | None = flag(
        None, "write DIR/step_NNNNNN.jsonl per step: prompt, response, tokens, reward, advantage (show_rollouts.py)"
    )
    rollout_dump_n: int = flag(16, "samples per step in the rollout dump", min=0)
    peak_tflops: float | None = flag(
        None, "peak TFLOP/s of one GPU for perf/mfu (default: from the CUDA device name; none on CPU)", min=0
    )
    quiet: bool = flag(False, "no progress line")


@dataclass(frozen=True)
class RayConfig:
    """``mtp-rl train --ray``: trainer ranks and a rollout actor in a Ray placement group."""

    ray: bool = flag(False, "run trainer ranks and a rollout actor on Ray")
    ray_num_trainers: int = flag(1, "trainer actors (the torch.distributed world)", min=1)
    ray_gpus_per_trainer: int = flag(0, "1 on GPU clusters", choices=[0, 1])
    ray_rollout_placement: str = flag(
        "colocated",
        "rollout actor shares trainer rank 0's bundle, or gets its own",
        choices=["colocated", "disaggregated"],
    )
    ray_engine_replace_timeout: float = flag(
        300.0,
        "seconds to re-place a dead SGLang engine actor in its bundle before the run goes on without it",
        min=0,
        min_exclusive=True,
    )


@dataclass(frozen=True)
class PretrainConfig:
    """``mtp-rl pretrain`` only: the warm start's stopping rule."""

    stop_at_accuracy: float | None = flag(
        None, "stop once greedy accuracy on validation problems (training distribution) reaches this", min=0
    )


@dataclass(frozen=True)
class RunConfig:
    """The whole run. Sections are read as ``cfg.section.name``; top-level fields are the run's own."""

    config: str | None = flag(None, "YAML file whose keys are flag names")
    num_steps: int = flag(30, "RL steps (rollout + updates)", min=0)
    seed: int = flag(1234, "seed of data, sampling and init", min=0)
    eval_interval: int = flag(5, "steps between held-out evaluations", min=1)
    command: str = flag("train", "the mtp-rl command (train | pretrain | heal)", cli=False)
    device: str | None = flag(None, "cpu | cuda: filled by the platform when the run is built", cli=False)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    algo: AlgoConfig = dataclasses.field(default_factory=AlgoConfig)
    mtp: MTPConfig = dataclasses.field(default_factory=MTPConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    ckpt: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    log: LogConfig = dataclasses.field(default_factory=LogConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    pretrain: PretrainConfig = dataclasses.field(default_factory=PretrainConfig)

    def replace(self, **changes) -> RunConfig:
        """A copy with ``section__field=value`` (or top-level ``field=value``) changed."""
        top, nested = {}, {}
        for k, v in changes.items():
            sec, _, name = k.partition("__")
            if name:
                nested.setdefault(sec, {})[name] = v
            else:
                top[k] = v
        for sec, kw in nested.items():
            top[sec] = replace(getattr(self, sec), **kw)
        return replace(self, **top)


SECTIONS: dict[str, type] = {
    f.name: typing.get_type_hints(RunConfig)[f.name] for f in fields(RunConfig) if "help" not in f.metadata
}
GROUP_TITLES = {
    "run": "run",
    "model": "model (Megatron names; default: the preset decides)",
    "parallel": "parallelism",
    "data": "task and data",
    "rollout": "rollout and rewards",
    "algo": "RL algorithm",
    "mtp": "MTP and OCC",
    "optim": "optimizer",
    "ckpt": "checkpoints",
    "log": "logging",
    "ray": "Ray",
    "pretrain": "warm start (mtp-rl pretrain)",
}


# -- types, conversion and checks (shared by the command line and YAML) -----------------------
def _leaf_fields(cls: type) -> list[tuple[dataclasses.Field, type]]:
    """(field, base type) of every flag-declared leaf of a section (or RunConfig's own fields)."""
    hints = typing.get_type_hints(cls)
    return [(f, _strip_optional(hints[f.name])) for f in fields(cls) if "help" in f.metadata]


def _kind(tp) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, "a single value")


def check_value(f: dataclasses.Field, value) -> None:
    """Choices and range of one converted value; raises ValueError with what was expected."""
    if value is None:
        return
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ValueError(f"expected one of {', '.join(map(str, m['choices']))}, got {value!r}")
    lo = m.get("min")
    if lo is not None:
        if m.get("min_exclusive") and not value > lo:
            raise ValueError(f"must be > {lo}, got {value}")
        if not m.get("min_exclusive") and not value >= lo:
            raise ValueError(f"must be ≥ {lo}, got {value}")


def convert_value(f: dataclasses.Field, tp, value):
    """A YAML value as the field's type (the same rules as the command line), checked."""
    optional = f.default is None
    if value is None:
        if optional:
            return None
        raise ValueError(f"expected {_kind(tp)}, got null")
    if isinstance(value, (list, dict)):
        what = "list" if isinstance(value, list) else "mapping"
        raise ValueError(f"expected a single value ({_kind(tp)}), got a {what}")
    if tp is bool:
        if not isinstance(value, bool):
            what = f"the string {value!r}" if isinstance(value, str) else repr(value)
            raise ValueError(f"expected true or false, got {what}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"expected a number, got {value!r}") from None
    elif tp is str:
        if isinstance(value, bool):
            raise ValueError(f"expected a string, got {value!r}")
        value = str(value)
    # a union such as ``int | str`` (e.g. --moe-layer-freq): any scalar, interpreted by its consumer
    check_value(f, value)
    return value


def _cli_type(f: dataclasses.Field, tp):
    if not isinstance(tp, type):  # a union such as ``int | str``: the text, interpreted by its consumer
        tp = str

    def parse(text: str):
        try:
            value = tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {_kind(tp)}, got {text!r}") from None
        try:
            check_value(f, value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = tp.__name__
    return parse


def _toggled_by_presets() -> set[str]:
    return {k for table in (ALGORITHMS, COMMANDS) for preset in table.values() for k in preset}


def _add_flag(group, f: dataclasses.Field, tp) -> None:
    m = f.metadata
    default = f.default if f.default is not dataclasses.MISSING else None
    help_text = m["help"] + ("" if default in (None, False, ()) else f" (default: {default})")
    kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
    if tp is bool:
        plain = default is False and f.name not in _toggled_by_presets()
        kw["action"] = "store_true" if plain else argparse.BooleanOptionalAction
    else:
        kw["type"] = _cli_type(f, tp)
        plain_name = tp.__name__.upper() if isinstance(tp, type) else "VALUE"
        kw["metavar"] = "{" + ",".join(map(str, m["choices"])) + "}" if m.get("choices") else plain_name
    group.add_argument(flag_name(f), **kw)


def _sections_for(command: str) -> dict[str, type]:
    return {k: v for k, v in SECTIONS.items() if k != "pretrain" or command == "pretrain"}


class _OneLineErrors(argparse.ArgumentParser):
    """A user mistake on the command line is one line (argparse prints the whole 90-line usage first)."""

    def error(self, message: str):
        print_user_error(f"{self.prog}: error: {message} ({self.prog} --help lists every flag)")
        self.exit(2)


def build_parser(command: str = "train") -> argparse.ArgumentParser:
    """The ``mtp-rl COMMAND`` parser, one argument group per section, generated from the fields."""
    p = _OneLineErrors(
        prog=f"mtp-rl {command}",
        description="RL with jointly trained MTP layers (OCC). --sglang-X v / --sglang-router-X v pass --X v "
        "to SGLang / its router.",
        allow_abbrev=False,
    )
    g = p.add_argument_group(GROUP_TITLES["run"])
    for f, tp in _leaf_fields(RunConfig):
        if f.metadata.get("cli", True):
            _add_flag(g, f, tp)
    for name, cls in _sections_for(command).items():
        g = p.add_argument_group(GROUP_TITLES[name], (cls.__doc__ or "").strip().splitlines()[0])
        for f, tp in _leaf_fields(cls):
            if f.metadata.get("cli", True):
                _add_flag(g, f, tp)
    return p


def _all_leaves(command: str) -> dict[str, tuple[str | None, dataclasses.Field, type]]:
    """field name → (section or None for top level, field, base type), for every CLI leaf."""
    out = {f.name: (None, f, tp) for f, tp in _leaf_fields(RunConfig) if f.metadata.get("cli", True)}
    for sec, cls in _sections_for(command).items():
        for f, tp in _leaf_fields(cls):
            if f.metadata.get("cli", True):
                if f.name in out:
                    raise RuntimeError(f"flag --{f.name} is declared twice ({out[f.name][0]} and {sec})")
                out[f.name] = (sec, f, tp)
    return out


def read_yaml(path: str, command: str = "train") -> dict:
    """The YAML config as {field name: converted value}; every problem as ``FILE:LINE: key: ...``."""
    import yaml

    leaves = _all_leaves(command)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        raise ConfigError(f"{path}:{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if node is None:
        return {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{path}:1: expected a mapping of flag names to values")
    out, problems = {}, []
    for key_node, _ in node.value:
        key, line = key_node.value, key_node.start_mark.line + 1
        name = str(key).lstrip("-").replace("-", "_")
        if name not in leaves or name == "config":
            problems.append(f"{path}:{line}: unknown key {key!r} (not a flag of mtp-rl {command})")
            continue
        _, f, tp = leaves[name]
        try:
            out[name] = convert_value(f, tp, data[key])
        except ValueError as e:
            problems.append(f"{path}:{line}: {key}: {e}")
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def parse_config(argv: list[str] | None = None, command: str = "train") -> RunConfig:
    """Flags → RunConfig: field defaults < presets < ``--config`` YAML < command line."""

    parser = build_parser(command)
    engine_flags, router_flags, rest = split_passthrough_args(list(sys.argv[1:] if argv is None else argv))
    cli = vars(parser.parse_args(rest))
    values = read_yaml(cli["config"], command) if cli.get("config") else {}
    values.update(cli)
    if command == "pretrain" and values.get("mtp_regime", "ce") != "ce":
        raise ConfigError(
            f"--mtp-regime {values['mtp_regime']}: mtp-rl pretrain always trains the main and MTP heads with "
            "cross-entropy; --mtp-regime is a flag of mtp-rl train"
        )
    values = apply_presets(values, command)
    values["sglang_engine_flags"], values["sglang_router_flags"] = tuple(engine_flags), tuple(router_flags)
    return resolve_defaults(build_config(values, command))


def apply_presets(values: dict, command: str = "train") -> dict:
    """The one place presets apply: the command's, then the algorithm's, to flags not given."""
    out = dict(values)
    for k, v in COMMANDS[command].items():
        out.setdefault(k, v)
    for k, v in ALGORITHMS[out.get("algorithm", AlgoConfig.algorithm)].items():
        out.setdefault(k, v)
    return out


def build_config(values: dict, command: str = "train") -> RunConfig:
    """A RunConfig from {field name: value} (names of any section; unknown names raise)."""
    per: dict[str | None, dict] = {}
    where = {f.name: None for f in fields(RunConfig) if "help" in f.metadata}
    for sec, cls in SECTIONS.items():
        where.update({f.name: sec for f in fields(cls)})
    for k, v in values.items():
        if k not in where:
            raise ConfigError(f"unknown setting {k!r}")
        per.setdefault(where[k], {})[k] = v
    top = per.pop(None, {})
    top["command"] = command
    sections = {sec: cls(**per.get(sec, {})) for sec, cls in SECTIONS.items()}
    return RunConfig(**top, **sections)


def resolve_defaults(cfg: RunConfig) -> RunConfig:
    """Defaults that depend on other flags (documented on their fields)."""
    file_data = bool(cfg.data.prompt_data) or bool(cfg.data.data_source)
    samples = cfg.rollout.rollout_batch_size * cfg.rollout.n_samples_per_prompt
    return cfg.replace(
        data__tokenizer=cfg.data.tokenizer or _checkpoint_tokenizer(cfg) or ("byte" if file_data else "arith"),
        rollout__reward_fn=cfg.rollout.reward_fn or ("math_verify" if cfg.data.prompt_data else "exact_match"),
        optim__global_batch_size=cfg.optim.global_batch_size or max(1, samples // 2),
    )


def _checkpoint_tokenizer(cfg: RunConfig) -> str | None:
    """``--load DIR``'s ``DIR/tokenizer`` (the converter copies the HF tokenizer there)."""
    from megatron_mtp_rl.rollout.tokenizer import checkpoint_tokenizer_dir

    found = checkpoint_tokenizer_dir(cfg.ckpt.load)
    return str(found) if found else None


def _data_and_log_problems(cfg: RunConfig) -> list[str]:
    """Stop ids, chat-template kwargs and W&B, checked before anything is built."""
    import importlib.util
    import json

    d, lg, problems = cfg.data, cfg.log, []
    if d.stop_token_ids:
        try:
            [int(x) for x in d.stop_token_ids.split(",") if x.strip()]
        except ValueError:
            problems.append(f"--stop-token-ids {d.stop_token_ids!r}: expected comma-separated integers")
    if d.chat_template_kwargs:
        try:
            kw = json.loads(d.chat_template_kwargs)
        except json.JSONDecodeError as e:
            problems.append(f"--chat-template-kwargs is not valid JSON ({e.msg}): {d.chat_template_kwargs}")
        else:
            if not isinstance(kw, dict):
                problems.append(f"--chat-template-kwargs must be a JSON object: {d.chat_template_kwargs}")
    if lg.wandb_project and lg.wandb_mode != "disabled" and importlib.util.find_spec("wandb") is None:
        problems.append(
            "--wandb-project needs the 'wandb' package: pip install 'megatron-mtp-rl[wandb]' (or --wandb-mode disabled)"
        )
    elif lg.wandb_project and lg.wandb_mode == "online" and not _wandb_credentials():
        problems.append(
            "--wandb-mode online needs a W&B login (`wandb login` or WANDB_API_KEY); or --wandb-mode offline "
            "and `wandb sync` the run directory later"
        )
    return problems


def _wandb_credentials() -> bool:
    """A W&B API key in the environment or in the netrc entry of the W&B host (what ``wandb login`` writes).

    Checked at start-up: without one, ``wandb.init`` fails only after the model was built.
    """
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_model_args(cfg: RunConfig, vocab_size: int) -> ModelArgs:
    """The run's ``ModelArgs``: the preset, overridden by every model flag that was given.

    ``--num-experts 0`` means a dense model; ``--seq-length`` comes from the data section. With
    ``--load DIR`` holding a checkpoint, its stored model arguments are the base instead and a
    disagreeing shape flag is a ConfigError naming both values.
    """
    base = PRESETS[cfg.model.preset]
    overrides = {f.name: getattr(cfg.model, f.name) for f in fields(ModelArgs) if hasattr(cfg.model, f.name)}
    saved = saved_model_args(cfg.ckpt.load)  # --load DIR: the checkpoint's shapes, no flags needed
    if saved is not None and is_hf_dir(cfg.ckpt.load):  # a release's dtype is storage: the run trains in
        saved = saved | {"params_dtype": "bf16" if cfg.model.bf16 else "fp32"}  # fp32 unless --bf16
    if saved is not None:
        return from_checkpoint(
            saved, overrides, vocab_size=vocab_size, seq_length=cfg.data.seq_length, bf16=cfg.model.bf16,
            where=cfg.ckpt.load,
        )  # fmt: skip
    dense = overrides.get("num_experts") == 0
    overrides["num_experts"] = overrides.get("num_experts") or None
    overrides.update(vocab_size=vocab_size, seq_length=cfg.data.seq_length)
    if cfg.model.bf16:
        overrides["params_dtype"] = "bf16"
    out = base.with_overrides(**overrides)
    return replace(out, num_experts=None) if dense else out


# -- validation --------------------------------------------------------------------------------
def _field_problems(cfg: RunConfig) -> list[str]:
    problems = []
    for obj in [cfg] + [getattr(cfg, s) for s in SECTIONS]:
        for f, _ in _leaf_fields(type(obj)):
            try:
                check_value(f, getattr(obj, f.name))
            except ValueError as e:
                problems.append(f"{flag_name(f)}: {e}")
    return problems


def _correction_problems(al: AlgoConfig, ro: RolloutConfig) -> list[str]:
    """The rollout-correction flags (rl/rollout_correction.py) and routing replay."""
    out = []
    if al.tis_cap is not None and (
        al.rollout_is not in ("none", "token") or al.rollout_is_cap not in (None, al.tis_cap)
    ):
        out.append("--tis-cap C is --rollout-is token --rollout-is-cap C: give one or the other")
    if al.rollout_is != "none" and al.rollout_is_cap is None:
        out.append("--rollout-is needs --rollout-is-cap C (truncated importance sampling)")
    if al.rollout_rs != "none":
        if al.rollout_rs_bounds is None:
            out.append("--rollout-rs needs --rollout-rs-bounds LOW,HIGH")
        else:
            try:
                lo, hi = (float(x) for x in al.rollout_rs_bounds.split(","))
                if not 0 <= lo < hi:
                    out.append(f"--rollout-rs-bounds needs 0 <= LOW < HIGH, got {al.rollout_rs_bounds}")
            except ValueError:
                out.append(f"--rollout-rs-bounds must be LOW,HIGH (two numbers), got {al.rollout_rs_bounds!r}")
    active = al.rollout_is != "none" or al.rollout_rs != "none" or al.rollout_veto_threshold is not None
    if active and ro.rollout_temperature != 1.0:
        out.append(
            "--rollout-is/-rs/-veto-threshold need the engine's log-probs of the policy itself: "
            f"--rollout-temperature must be 1, got {ro.rollout_temperature}"
        )
    if ro.rollout_dtype and any(f == "--dtype" or f.startswith("--dtype=") for f in ro.sglang_engine_flags):
        out.append("--rollout-dtype is SGLang's --dtype: give one (not --sglang-dtype too)")
    if al.use_rollout_routing_replay and al.use_routing_replay:
        out.append("--use-rollout-routing-replay (R3) and --use-routing-replay (R2): choose one")
    return out


def _routing_problems(cfg: RunConfig, m: ModelArgs) -> list[str]:
    """What R3 / R2 (models/routing_replay.py) cannot do yet."""
    al, ro, par = cfg.algo, cfg.rollout, cfg.parallel
    which = [f for f, on in (("--use-rollout-routing-replay", al.use_rollout_routing_replay),
                             ("--use-routing-replay", al.use_routing_replay)) if on]  # fmt: skip
    if not which:
        return []
    out = []
    if not m.num_experts:
        out.append(f"{which[0]} needs an MoE model (--num-experts)")
    if par.recompute_granularity:
        out.append(f"{which[0]} does not support --recompute-granularity yet (the recompute would route live)")
    if al.use_rollout_routing_replay:
        if ro.local_spec_decode:
            out.append("--use-rollout-routing-replay records routes with plain sampling: drop --local-spec-decode")
        if cfg.ray.ray:
            out.append("--use-rollout-routing-replay: the Ray rollout actor does not return routes yet")
    return out


def validate(
    cfg: RunConfig, world_size: int, model_args: ModelArgs | None = None, cuda: bool | None = None
) -> list[str]:
    """Every problem with the configuration, one clear message each (empty list: fine).

    Runs before anything is built, so a bad launch fails in seconds with all its problems.
    ``model_args``: the resolved model (default: resolved with the tokenizer-independent vocab 64).
    ``cuda``: whether the run will have a GPU (None: unknown, GPU-only features not checked).
    """
    m = model_args or resolve_model_args(cfg, 64)
    par, ro, al, op, mt = cfg.parallel, cfg.rollout, cfg.algo, cfg.optim, cfg.mtp
    problems = _field_problems(cfg)
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    ep, cp = par.expert_model_parallel_size, par.context_parallel_size
    if problems:  # sizes below 1 make the arithmetic below meaningless
        return problems
    if world_size % (tp * pp * cp):
        problems.append(
            f"the world size {world_size} is not divisible by TP×PP×CP = {tp}×{pp}×{cp} "
            "(--tensor-/--pipeline-/--context-parallel-size)"
        )
    dp = max(1, world_size // (tp * pp * cp))
    if al.tis_cap is not None and ro.rollout_temperature != 1.0:
        problems.append(
            f"--tis-cap needs the engine's log-probs of the policy itself: --rollout-temperature must be 1, "
            f"got {ro.rollout_temperature}"
        )
    problems += _correction_problems(al, ro)
    problems += _routing_problems(cfg, m)
    problems += _long_generation_problems(cfg, dp)
    if m.num_attention_heads % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} does not divide --num-attention-heads {m.num_attention_heads}"
        )
    groups = m.num_query_groups or m.num_attention_heads
    if groups % tp:
        problems.append(f"--tensor-model-parallel-size {tp} does not divide --num-query-groups {groups}")
    padded = -(-m.vocab_size // m.make_vocab_size_divisible_by) * m.make_vocab_size_divisible_by
    if padded % tp:
        problems.append(
            f"--tensor-model-parallel-size {tp} does not divide the padded vocabulary {padded} "
            f"(vocabulary {m.vocab_size} rounded up to --make-vocab-size-divisible-by {m.make_vocab_size_divisible_by})"
        )
    if m.num_experts and m.num_experts % ep:
        problems.append(f"--expert-model-parallel-size {ep} does not divide --num-experts {m.num_experts}")
    if m.num_experts and tp > 1 and not cfg.parallel.sequence_parallel:
        problems.append(
            f"MoE with --tensor-model-parallel-size {tp} needs --sequence-parallel (megatron-core's MoE layers "
            "require it with TP); or shard the experts with --expert-model-parallel-size instead"
        )
    if ep > 1 and not m.num_experts:
        problems.append(f"--expert-model-parallel-size {ep} needs a MoE model (--num-experts)")
    if m.num_layers % pp:
        problems.append(f"--pipeline-model-parallel-size {pp} does not divide --num-layers {m.num_layers}")
    if cfg.data.arith_max_digits is not None and cfg.data.arith_max_digits < cfg.data.arith_digits:
        problems.append(
            f"--arith-max-digits {cfg.data.arith_max_digits} is below --arith-digits {cfg.data.arith_digits}"
        )
    if not cfg.data.prompt_data and not cfg.data.data_source:
        longest = 1 + 2 * (cfg.data.arith_max_digits or cfg.data.arith_digits) + 2 + ro.rollout_max_response_len
        if longest > cfg.data.seq_length:
            problems.append(
                f"--seq-length {cfg.data.seq_length} is shorter than the longest arith sample "
                f"({longest} tokens with --rollout-max-response-len {ro.rollout_max_response_len})"
            )
    if cfg.command == "train":
        runs_mtp = mt.mtp_regime != "none"
        if runs_mtp and not m.mtp_num_layers:
            problems.append(f"--mtp-regime {mt.mtp_regime} needs MTP layers: set --mtp-num-layers ≥ 1")
        if mt.occ_min > mt.occ_max:
            problems.append(f"--occ-min {mt.occ_min} is larger than --occ-max {mt.occ_max}")
        if not mt.occ_ema < 1.0:
            problems.append(f"--occ-ema must be < 1, got {mt.occ_ema}")
        if al.kl_coef > 0 and not (cfg.ckpt.ref_load or cfg.ckpt.load):
            problems.append(
                f"--kl-coef {al.kl_coef} needs a reference model: --ref-load DIR (or --load DIR, whose weights "
                "are then the reference)"
            )
    if ro.local_spec_decode and not m.mtp_num_layers:
        problems.append("--local-spec-decode drafts with the MTP layers: set --mtp-num-layers ≥ 1")
    samples = ro.rollout_batch_size * ro.n_samples_per_prompt
    gbs = op.global_batch_size or max(1, samples // 2)
    if ro.rollout_batch_size % dp:
        problems.append(f"--rollout-batch-size {ro.rollout_batch_size} is not divisible by the data-parallel size {dp}")
    if gbs % dp:
        problems.append(f"--global-batch-size {gbs} is not divisible by the data-parallel size {dp}")
    if cfg.command == "train" and samples % gbs:
        problems.append(
            f"--global-batch-size {gbs} does not divide the rollout batch "
            f"({ro.rollout_batch_size} prompts × {ro.n_samples_per_prompt} samples = {samples})"
        )
    if op.use_dynamic_batch_size and not op.max_tokens_per_gpu:
        problems.append("--use-dynamic-batch-size needs --max-tokens-per-gpu N (the token budget of a micro-batch)")
    if op.max_tokens_per_gpu and not op.use_dynamic_batch_size:
        problems.append("--max-tokens-per-gpu applies with --use-dynamic-batch-size")
    if op.balance_data and not op.use_dynamic_batch_size and pp > 1:
        problems.append("--balance-data with pipeline parallelism needs --use-dynamic-batch-size")
    if gbs // dp % op.micro_batch_size and pp > 1 and not op.use_dynamic_batch_size:
        problems.append("with pipeline parallelism --micro-batch-size must divide --global-batch-size / DP")
    if pp > 1 and ro.rollout_engine == "local" and not cfg.ray.ray:
        problems.append(
            "the local rollout engine generates with PP=1 only; use --rollout-engine sglang (or --ray, whose "
            "rollout actor holds a PP=1 replica) for PP > 1"
        )
    if ep > 1 and m.num_experts and ro.rollout_engine == "local" and not cfg.ray.ray and al.dynamic_sampling:
        problems.append(  # models/lockstep.py keeps one generate call in step, not a rank-local number of rounds
            "--dynamic-sampling with the local rollout engine and --expert-model-parallel-size > 1: the ranks "
            "would generate different numbers of rounds; use --rollout-engine sglang"
        )
    if ep > 1 and m.num_experts and op.use_dynamic_batch_size and cuda is False:
        problems.append(
            "--use-dynamic-batch-size with --expert-model-parallel-size > 1 needs a GPU: on CPU megatron's "
            "all-gather token dispatcher needs the same number of tokens on every rank"
        )
    if cp > 1:
        problems.append("--context-parallel-size > 1 is not supported by the RL forward yet")
    problems += _data_and_log_problems(cfg)
    est = al.advantage_estimator
    if est not in ADVANTAGE_ESTIMATORS and ":" not in est and "." not in est:
        problems.append(
            f"--advantage-estimator {est!r}: not one of {', '.join(ADVANTAGE_ESTIMATORS)} nor a module:function path"
        )
    balance = op.use_dynamic_batch_size if op.balance_data is None else op.balance_data
    if balance and est in ("reinforce_plus_plus", "reinforce_plus_plus_baseline", "gae", "opd"):
        problems.append(
            f"--advantage-estimator {est} gives per-token advantages, computed where each sample is trained: "
            "not with --balance-data (on with --use-dynamic-batch-size), which deals samples to other ranks; "
            "add --no-balance-data"
        )
    if est == "opd" and cfg.command == "train" and not cfg.ckpt.teacher_load:
        problems.append("--advantage-estimator opd needs a teacher: --teacher-load DIR")
    if al.gamma > 1 or al.lam > 1:
        problems.append(f"--gamma {al.gamma} and --lam {al.lam} must be in [0, 1]")
    problems += _critic_problems(cfg)
    if cfg.command == "train" and ro.n_samples_per_prompt < 2:
        problems.append("--n-samples-per-prompt must be ≥ 2 (group-normalised advantages)")
    if ro.rollout_engine == "local" and (ro.sglang_engine_flags or ro.sglang_router_flags):
        problems.append("--sglang-* flags need --rollout-engine sglang")
    problems += _size_problems(ro.max_shard_size, "--max-shard-size")
    if ro.rollout_engine_urls is not None:
        problems += _engine_urls_problems(ro)
    if ro.local_spec_decode and ro.rollout_engine != "local":
        problems.append("--local-spec-decode is for the local engine; SGLang drafts with --sglang-speculative-*")
    problems += _memory_and_kernel_problems(cfg, cuda)
    if ro.rollout_engine == "sglang" and ro.rollout_engine_urls is None and not cfg.ray.ray:  # engines started here
        from megatron_mtp_rl.rollout.sglang.gpu_only import engine_flag_problems

        problems += engine_flag_problems(ro.sglang_engine_flags, cuda=cuda)
    return problems


def _size_problems(value: str, flag_text: str) -> list[str]:
    from megatron_mtp_rl.hf.shards import parse_size

    try:
        parse_size(value)
    except ValueError as e:
        return [f"{flag_text}: {e}"]
    return []


def _engine_urls_problems(ro: RolloutConfig) -> list[str]:
    """``--rollout-engine-urls``: SGLang servers someone else runs."""
    out = []
    if ro.rollout_engine != "sglang":
        out.append("--rollout-engine-urls needs --rollout-engine sglang")
    if ro.rollout_server_cmd or ro.rollout_router_cmd:
        out.append("--rollout-engine-urls: the servers are started elsewhere; drop --rollout-server-cmd/-router-cmd")
    urls = [u.strip() for u in ro.rollout_engine_urls.split(",") if u.strip()]
    bad = [u for u in urls if not u.startswith(("http://", "https://"))]
    if not urls or bad:
        out.append(f"--rollout-engine-urls {ro.rollout_engine_urls!r}: expected http://HOST:PORT[,http://HOST:PORT...]")
    return out


def _critic_problems(cfg: RunConfig) -> list[str]:
    """PPO with a critic (``--advantage-estimator gae``): what its critic supports."""
    al, par, problems = cfg.algo, cfg.parallel, []
    gae = al.advantage_estimator == "gae"
    if not gae:
        given = [name for name, on in (("--critic-load", cfg.ckpt.critic_load), ("--critic-lr", cfg.optim.critic_lr),
                 ("--critic-warmup-steps", al.critic_warmup_steps)) if on]  # fmt: skip
        if given:
            problems.append(f"{', '.join(given)}: only with --advantage-estimator gae (the runs with a critic)")
        return problems
    if par.pipeline_model_parallel_size > 1:
        problems.append("--advantage-estimator gae: the critic runs with --pipeline-model-parallel-size 1 only")
    if par.sequence_parallel:
        problems.append("--advantage-estimator gae: the critic's value head does not support --sequence-parallel")
    return problems


def _memory_and_kernel_problems(cfg: RunConfig, cuda: bool | None) -> list[str]:
    """megatron's scale features: what they need (``cuda=None``: the device is not known yet,
    e.g. a recipe checked on a CPU machine; only device-independent rules apply)."""
    par, problems = cfg.parallel, []
    te = par.transformer_impl != "local"
    if par.recompute_granularity == "full" and not par.recompute_method:
        problems.append("--recompute-granularity full needs --recompute-method uniform|block")
    if par.recompute_granularity != "full" and (par.recompute_method or par.recompute_num_layers):
        problems.append("--recompute-method / --recompute-num-layers go with --recompute-granularity full")
    if par.sequence_parallel and par.tensor_model_parallel_size == 1:
        problems.append("--sequence-parallel shards over TP ranks: it needs --tensor-model-parallel-size > 1")
    if par.sequence_parallel and not te:
        problems.append("--sequence-parallel needs --transformer-impl transformer_engine (the local norm refuses it)")
    if cuda is False:
        gpu_only = [
            ("--use-distributed-optimizer", par.use_distributed_optimizer, "megatron's distributed optimizer "
             "refuses CPU parameters"),
            ("--sequence-parallel", par.sequence_parallel, "it needs Transformer Engine's norms"),
            ("--recompute-granularity", par.recompute_granularity, "megatron's recompute forks the CUDA RNG"),
            ("--transformer-impl transformer_engine", par.transformer_impl == "transformer_engine",
             "Transformer Engine runs on CUDA"),
        ]  # fmt: skip
        for name, on, why in gpu_only:
            if on:
                problems.append(f"{name} needs a CUDA GPU ({why}); this machine has none")
    return problems


def check(cfg: RunConfig, world_size: int, model_args: ModelArgs | None = None, cuda: bool | None = None) -> None:
    """Raise one ConfigError listing every problem (see :func:`validate`)."""
    problems = validate(cfg, world_size, model_args, cuda)
    if problems:
        raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _long_generation_problems(cfg: RunConfig, dp: int) -> list[str]:
    """--partial-rollout, --over-sampling-batch-size, --max-off-policy-steps, --rollout-is-cap."""
    ro, al = cfg.rollout, cfg.algo
    out = []
    if ro.over_sampling_batch_size is not None and not ro.partial_rollout:
        out.append("--over-sampling-batch-size needs --partial-rollout")
    if ro.mask_offpolicy_in_partial_rollout and not ro.partial_rollout:
        out.append("--mask-offpolicy-in-partial-rollout needs --partial-rollout")
    if ro.partial_rollout:
        over = ro.over_sampling_batch_size or 2 * ro.rollout_batch_size
        if over < ro.rollout_batch_size:
            out.append(f"--over-sampling-batch-size {over} is below --rollout-batch-size {ro.rollout_batch_size}")
        if over % dp:
            out.append(f"--over-sampling-batch-size {over} is not divisible by the data-parallel size {dp}")
        if ro.rollout_function:
            out.append("--partial-rollout replaces the rollout function: not with --rollout-function")
        if cfg.ray.ray and ro.rollout_engine == "local":
            out.append("--partial-rollout with --ray needs --rollout-engine sglang (the Ray rollout actor has no stop)")
    decoupled = (ro.max_off_policy_steps or 1) > 1
    if (al.rollout_is_cap is not None or decoupled) and ro.rollout_temperature != 1.0:
        what = "--rollout-is-cap" if al.rollout_is_cap is not None else "--max-off-policy-steps > 1"
        out.append(
            f"{what} weights by π_old/π_rollout with the engine's log-probs of the policy itself: "
            f"--rollout-temperature must be 1, got {ro.rollout_temperature}"
        )
    return out
