"""Builders: one function per component of a run, each reading only the config sections it needs.

``build_run`` (validate, parallel state, tokenizer, data, model, optimizer, OCC) →
``build_engine`` (local / SGLang / Ray actor, weight sync included) → ``build_reference`` (KL) →
``build_loss`` → ``build_rollout`` (manager, reward scorer, extension points).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from megatron.core import parallel_state
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_mtp_rl import platform
from megatron_mtp_rl.config import RunConfig, check, resolve_model_args
from megatron_mtp_rl.errors import ConfigError
from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.models.presets import ModelArgs
from megatron_mtp_rl.models.provider import RuntimeOptions
from megatron_mtp_rl.models.provider import build_model as build_gpt
from megatron_mtp_rl.rl import OCCConfig, OCCEstimator, RLLossConfig, zero_alignment_warning
from megatron_mtp_rl.rl.advantages import ESTIMATORS, Estimator, sample_estimator
from megatron_mtp_rl.rl.regimes import get_regime
from megatron_mtp_rl.rl.rollout_correction import RolloutCorrection
from megatron_mtp_rl.rollout.chat import prompt_format
from megatron_mtp_rl.rollout.data import ArithTask, FilePromptSource
from megatron_mtp_rl.rollout.engine import RemoteEngine, RolloutEngine, StagedRemoteEngine
from megatron_mtp_rl.rollout.local_engine import LocalEngine
from megatron_mtp_rl.rollout.manager import RolloutManager
from megatron_mtp_rl.rollout.reward_sandbox import build_scorer
from megatron_mtp_rl.rollout.tokenizer import build_tokenizer, check_vocab, parse_stop_ids
from megatron_mtp_rl.train.optim import build_optimizer, wrap_ddp
from megatron_mtp_rl.train.run_lock import claim_run
from megatron_mtp_rl.train.schedule import configure, forward_backward


@dataclass
class Run:
    """What every command trains: the model (bare and DDP-wrapped), its optimizer, data, OCC."""

    cfg: RunConfig
    model_args: ModelArgs
    tokenizer: object
    source: object  # a PromptSource: take(start, count), eval_prompts()
    gpt: torch.nn.Module  # the GPTModel (generation, export, parameter norms)
    model: torch.nn.Module  # DDP-wrapped (training, checkpoints)
    optimizer: object
    scheduler: OptimizerParamScheduler
    occ: OCCEstimator | None


def warn(msg: str) -> None:
    """A start-up warning on stderr, once (global rank 0)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def load_extension(spec: str, flag: str) -> Callable:
    """``module:function`` or ``module.function`` → the callable; a bad path is a ConfigError."""
    module, sep, name = spec.partition(":")
    if not sep:
        module, _, name = spec.rpartition(".")
    if not module or not name:
        raise ConfigError(f"{flag} {spec!r}: expected 'module:function' (or 'module.function')")
    try:
        fn = getattr(_import(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{flag} {spec!r}: cannot load ({e})") from None
    if not callable(fn):
        raise ConfigError(f"{flag} {spec!r} is not callable")
    return fn


def _import(module: str):
    """Import ``module``; modules of the working directory are found too (as ``python -m`` would)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if os.getcwd() in sys.path or not (e.name and module.startswith(e.name)):
            raise
        sys.path.append(os.getcwd())
        return importlib.import_module(module)


# -- the run: parallel state, data, model, optimizer ------------------------------------------
def build_run(cfg: RunConfig) -> Run:
    """Validate (every problem at once), initialise torch.distributed, build model and data."""
    tokenizer = build_tokenizer(cfg.data.tokenizer, extra_stop_ids=parse_stop_ids(cfg.data.stop_token_ids))
    model_args = resolve_model_args(cfg, model_vocab_size(cfg, tokenizer))
    check(cfg, int(os.environ.get("WORLD_SIZE", "1")), model_args, cuda=platform.use_cuda())
    prompt_format(cfg.data).validate(tokenizer)
    par = cfg.parallel
    sizes = platform.ParallelSizes(
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        expert_model_parallel_size=par.expert_model_parallel_size,
        context_parallel_size=par.context_parallel_size,
    )
    platform.initialize(sizes, seed=cfg.seed, timeout_minutes=par.distributed_timeout_minutes)
    # Before anything is built: --save writable and locked, a used --save resumed or refused.
    c = cfg.ckpt
    load = claim_run(c.save, cfg.log.metrics_jsonl, c.load, auto_resume=not c.no_auto_resume)
    cfg = cfg.replace(device=platform.device().type, ckpt__load=load)
    source = build_data_source(cfg, tokenizer)
    gpt, model, optimizer, scheduler = build_model(cfg, model_args)
    occ = build_occ(cfg, model_args)
    if cfg.command == "train":
        msg = zero_alignment_warning(
            regime=cfg.mtp.mtp_regime, reduce=cfg.mtp.occ_reduce, minibatches_per_rollout=updates_per_step(cfg)
        )
        if msg:
            warn(msg)
    return Run(cfg, model_args, tokenizer, source, gpt, model, optimizer, scheduler, occ)


def model_vocab_size(cfg: RunConfig, tokenizer) -> int:
    """The model's vocabulary: the ``--load`` checkpoint's (a converted HF model's may exceed its
    tokenizer's, e.g. Qwen's 151936 rows for 151665 tokens), else the tokenizer's. A tokenizer with
    ids the checkpoint has no rows for is refused here, before anything is built."""
    from megatron_mtp_rl.train.saved_args import saved_model_args

    saved = (saved_model_args(cfg.ckpt.load) or {}).get("vocab_size")
    if saved is None:
        return tokenizer.vocab_size
    check_vocab(tokenizer, int(saved), f"the checkpoint {cfg.ckpt.load}")
    return int(saved)


def updates_per_step(cfg: RunConfig) -> int:
    """Optimizer steps per RL step: rollout samples / global batch size."""
    ro = cfg.rollout
    return max(1, ro.rollout_batch_size * ro.n_samples_per_prompt // cfg.optim.global_batch_size)


def build_data_source(cfg: RunConfig, tokenizer):
    """``--data-source module:function(cfg, tokenizer)``, else ``--prompt-data``, else the arith task."""
    d = cfg.data
    if d.data_source:
        return load_extension(d.data_source, "--data-source")(cfg, tokenizer)
    if d.prompt_data:
        source = FilePromptSource(
            d.prompt_data,
            input_key=d.input_key,
            label_key=d.label_key,
            seed=cfg.seed,
            template=d.prompt_template,
            max_prompt_tokens=d.seq_length - cfg.rollout.rollout_max_response_len - 1,
            length_rule=f"--seq-length {d.seq_length} - --rollout-max-response-len "
            f"{cfg.rollout.rollout_max_response_len} - 1",
            tokenizer=tokenizer,
            fmt=prompt_format(d),
            on_bad_row=d.on_bad_row,
            eval_path=d.eval_data,
        )
        if source.skipped:
            warn(f"--on-bad-row skip dropped {source.skipped} bad prompt row(s); the first: {source.problems[0]}")
        return source
    num_eval = d.num_eval_prompts
    cap = ArithTask.max_eval(d.arith_digits, d.arith_ops, d.arith_max_digits)
    if num_eval > cap:  # e.g. 1-digit '+': 100 problems in all, the default 200 cannot be held out
        total = ArithTask.distinct_problems(d.arith_digits, d.arith_ops, d.arith_max_digits)
        warn(
            f"--num-eval-prompts {num_eval}: the arith task (--arith-digits {d.arith_digits}, --arith-ops "
            f"{d.arith_ops!r}) has {total} distinct problems; holding out {cap} for eval, the rest train"
        )
        num_eval = cap
    return ArithTask(
        seed=cfg.seed,
        digits=d.arith_digits,
        ops=d.arith_ops,
        num_eval=num_eval,
        max_digits=d.arith_max_digits,
    )


def build_model(cfg: RunConfig, model_args: ModelArgs):
    """(GPTModel, DDP-wrapped model, optimizer, LR scheduler); the schedule hook installed."""
    op = cfg.optim
    par = cfg.parallel
    gpt = build_gpt(model_args, runtime=runtime_options(cfg))
    model = wrap_ddp(gpt, use_distributed_optimizer=par.use_distributed_optimizer)
    configure(model)
    optimizer = build_optimizer(
        model, lr=op.lr, weight_decay=op.weight_decay, adam_beta1=op.adam_beta1, adam_beta2=op.adam_beta2
    )
    total_updates = max(1, cfg.num_steps * (updates_per_step(cfg) if cfg.command == "train" else 1))
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if op.lr_warmup_steps else op.lr,
        max_lr=op.lr,
        min_lr=op.min_lr,
        lr_warmup_steps=op.lr_warmup_steps,
        lr_decay_steps=total_updates,
        lr_decay_style=op.lr_decay_style,
        start_wd=op.weight_decay,
        end_wd=op.weight_decay,
        wd_incr_steps=total_updates,
        wd_incr_style="constant",
    )
    return gpt, model, optimizer, scheduler


def runtime_options(cfg: RunConfig) -> RuntimeOptions:
    """The run's kernel and memory options for the provider (not part of the model's shape)."""
    par = cfg.parallel
    return RuntimeOptions(
        transformer_impl=par.transformer_impl,
        sequence_parallel=par.sequence_parallel,
        recompute_granularity=par.recompute_granularity,
        recompute_method=par.recompute_method,
        recompute_num_layers=par.recompute_num_layers,
        routing_replay=trainer_replays_routes(cfg),
    )


def engine_records_routes(cfg: RunConfig, model_args: ModelArgs) -> bool:
    """The engine returns each sample's MoE routes: R3, or an engine precision of its own
    (``--rollout-dtype``: then ``rollout/routing_agreement`` is reported without R3)."""
    al = cfg.algo
    return bool(model_args.num_experts) and (al.use_rollout_routing_replay or cfg.rollout.rollout_dtype is not None)


def trainer_replays_routes(cfg: RunConfig) -> bool:
    """The trainer's MoE routers get megatron's RouterReplay (R3, R2, or agreement with the engine's routes)."""
    al = cfg.algo
    return al.use_rollout_routing_replay or al.use_routing_replay or cfg.rollout.rollout_dtype is not None


def build_occ(cfg: RunConfig, model_args: ModelArgs) -> OCCEstimator | None:
    """OCC's λ estimator when the regime trains MTP layers (``--mtp-regime``, ``--occ-*``)."""
    mt = cfg.mtp
    if cfg.command != "train" or not get_regime(mt.mtp_regime).runs_mtp or not model_args.mtp_num_layers:
        return None
    occ_cfg = OCCConfig(
        ratio=mt.occ_ratio,
        eps=mt.occ_eps,
        lo=mt.occ_min,
        hi=mt.occ_max,
        ema=mt.occ_ema,
        init=mt.occ_init,
        baseline=mt.occ_baseline,
        reduce=mt.occ_reduce,
    )
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return OCCEstimator(model_args.mtp_num_layers, occ_cfg, group=group)


# -- the loss ---------------------------------------------------------------------------------
def build_loss(cfg: RunConfig) -> RLLossConfig:
    """The RL loss terms (``--eps-clip`` ..., ``--kl-*``, ``--entropy-coef``, ``--mtp-*``)."""
    al, mt = cfg.algo, cfg.mtp
    kl_in_reward = build_advantage_estimator(cfg).kl_in_reward  # e.g. reinforce_plus_plus: KL is in the rewards
    return RLLossConfig(
        eps_clip=al.eps_clip,
        eps_clip_high=al.eps_clip_high,
        eps_clip_c=al.eps_clip_c,
        loss_agg_mode=al.loss_agg_mode,
        ratio_type=al.ratio_type,
        kl_coef=0.0 if kl_in_reward else al.kl_coef,
        kl_type=al.kl_type,
        entropy_coef=al.entropy_coef,
        mtp_regime=mt.mtp_regime,
        mtp_loss_coef=mt.mtp_loss_coef,
        mtp_head_loss=mt.mtp_head_loss,
        mtp_head_coef=mt.mtp_head_coef,
        tis_cap=importance_cap(cfg) if al.rollout_is in ("none", "token") else None,
        correction=RolloutCorrection.from_flags(
            al.rollout_is if al.rollout_is not in ("none", "token") else "none",
            importance_cap(cfg) if al.rollout_is not in ("none", "token") else None,
            al.rollout_rs,
            al.rollout_rs_bounds,
            al.rollout_veto_threshold,
        ),
    )


def generation_depth(cfg: RunConfig) -> int:
    """How many batches generation runs ahead of training (0: each step generates its own).

    ``--max-off-policy-steps K`` bounds the lag of every trained token. A carried-over partial sample is one
    version older than its batch's fresh samples, so with ``--partial-rollout`` fresh samples run K − 1
    ahead and a sample may be continued once and still train (twice: it is dropped as stale)."""
    ro = cfg.rollout
    if ro.max_off_policy_steps:
        return ro.max_off_policy_steps - 1 if ro.partial_rollout else ro.max_off_policy_steps
    return 1 if ro.async_rollout else 0


def importance_cap(cfg: RunConfig) -> float | None:
    """The truncation of π_old/π_rollout on the policy loss: --tis-cap, else --rollout-is-cap; with
    --max-off-policy-steps K > 1 always on (AReaL's decoupled PPO; untruncated without a cap)."""
    al = cfg.algo
    cap = al.tis_cap if al.tis_cap is not None else al.rollout_is_cap
    if cap is None and (cfg.rollout.max_off_policy_steps or 1) > 1:
        return float("inf")
    return cap


# -- the reference model (KL) -----------------------------------------------------------------
class Reference:
    """A frozen second model scoring the main head's log-probs through the same schedule.

    The KL reference fills ``ref_logprobs``; the distillation teacher (``attr="teacher_logprobs"``) too.
    """

    def __init__(self, model: torch.nn.Module, path: str, attr: str = "ref_logprobs"):
        self.model = model
        self.path = path
        self.attr = attr

    @torch.no_grad()
    def score(self, micro_batches: list) -> None:
        """Fill ``self.attr`` of each micro-batch (forward-only schedule: PP-safe)."""
        outs = forward_backward(self.model, micro_batches, None, forward_only=True, with_mtp=False)
        if not parallel_state.is_pipeline_last_stage():
            return
        for batch, out in zip(micro_batches, outs):
            setattr(batch, self.attr, out.logprobs.detach())


def build_reference(cfg: RunConfig, run: Run) -> Reference | None:
    """``--kl-coef > 0``: the model of ``--ref-load DIR``, else of the ``--load`` checkpoint.

    Built as its own GPTModel with the run's shape and parallel layout and loaded from a dist
    checkpoint (never a copy of the live policy, never random weights).
    """
    if cfg.algo.kl_coef <= 0:
        return None
    from megatron_mtp_rl.hf.directory import is_hf_dir
    from megatron_mtp_rl.train.checkpoint import latest_checkpoint

    path = cfg.ckpt.ref_load or cfg.ckpt.load
    flag = "--ref-load" if cfg.ckpt.ref_load else "--load"
    hf = is_hf_dir(path)
    if not hf and latest_checkpoint(path) is None:
        raise ConfigError(f"{flag} {path}: no checkpoint there for the KL reference (--kl-coef {cfg.algo.kl_coef})")
    # R3: the reference replays the engine's routes too (models/routing_replay.py)
    replay = RuntimeOptions(routing_replay=cfg.algo.use_rollout_routing_replay)
    return Reference(_frozen_model(run.model_args, path, runtime=replay), path)


def _frozen_model(args: ModelArgs, path: str, runtime: RuntimeOptions | None = None) -> torch.nn.Module:
    """A model of ``args`` with the weights of ``path`` (our checkpoint, or an HF directory: each rank
    reads its own slices), in eval mode with no gradients."""
    from megatron_mtp_rl.hf.directory import is_hf_dir
    from megatron_mtp_rl.hf.load import load_hf
    from megatron_mtp_rl.train.checkpoint import load_checkpoint

    model = build_gpt(args, runtime=runtime)
    if is_hf_dir(path):
        load_hf(model, path)
    else:
        load_checkpoint(path, model, None)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_teacher(cfg: RunConfig, run: Run) -> Reference | None:
    """``--advantage-estimator opd``: the frozen teacher of ``--teacher-load DIR`` (a checkpoint or an HF
    directory), scored like the KL reference. Its shape is its own (a larger teacher is fine); its
    vocabulary must be the policy's (log-probs of the same token ids)."""
    path = cfg.ckpt.teacher_load
    if cfg.algo.advantage_estimator != "opd" or not path:
        return None
    from megatron_mtp_rl.hf.directory import is_hf_dir
    from megatron_mtp_rl.models.presets import from_checkpoint
    from megatron_mtp_rl.train.checkpoint import latest_checkpoint
    from megatron_mtp_rl.train.saved_args import saved_model_args

    hf = is_hf_dir(path)
    if not hf and latest_checkpoint(path) is None:
        raise ConfigError(f"--teacher-load {path}: no checkpoint there for the distillation teacher")
    ma = run.model_args
    saved = saved_model_args(path) or asdict(ma)
    if int(saved.get("vocab_size", ma.vocab_size)) != ma.vocab_size:
        raise ConfigError(
            f"--teacher-load {path}: the teacher's vocabulary ({saved['vocab_size']}) is not the policy's "
            f"({ma.vocab_size}); distillation compares log-probs of the same token ids"
        )
    if hf:  # a release's dtype is storage: the teacher runs in the run's precision
        saved = saved | {"params_dtype": "bf16" if cfg.model.bf16 else "fp32"}
    args = from_checkpoint(
        saved, {}, vocab_size=ma.vocab_size, seq_length=ma.seq_length, bf16=cfg.model.bf16, where="--teacher-load"
    )
    return Reference(_frozen_model(args, path), path, attr="teacher_logprobs")


# -- rollout: engine (with weight sync), manager, extension points ----------------------------
def build_engine(cfg: RunConfig, run: Run, *, rollout_actor=None, engines=None) -> RolloutEngine:
    """The rollout engine with its weight sync, already holding the current weights.

    local: the training model itself. ``rollout_actor`` (``--ray``): a Ray RolloutActor that
    gets full tensors pushed. ``--rollout-engine sglang``: HF export, servers (+ router)
    launched by global rank 0 — as subprocesses, or with ``engines`` (``--ray``: a
    ``cluster/placement.py:RayEngineGroup``) as Ray actors on their nodes — ``WeightSync`` after each step.
    """
    if rollout_actor is not None:
        return _ray_engine(cfg, run, rollout_actor)
    if cfg.rollout.rollout_engine == "sglang":
        return _sglang_engine(cfg, run, engines)
    if generation_depth(cfg):
        return _process_engine(cfg, run)
    # the model's vocabulary, as the trainer normalises over it (a converted checkpoint may have more rows than
    # its tokenizer has ids): sampler and trainer log-probs then agree
    return LocalEngine(
        run.gpt,
        vocab_size=run.model_args.vocab_size,
        speculative=cfg.rollout.local_spec_decode,
        dtype=cfg.rollout.rollout_dtype,
        record_routes=engine_records_routes(cfg, run.model_args),
    )


def _process_engine(cfg: RunConfig, run: Run) -> RolloutEngine:
    """--async-rollout with the local engine: a TP=1 replica in a child process per model-parallel
    leader, full tensors pushed after every step (and now, so it starts from the loaded weights)."""
    from dataclasses import asdict

    import torch.distributed as dist

    from megatron_mtp_rl.hf.mapping import gather_full_state
    from megatron_mtp_rl.models.mtp_forward import unwrap
    from megatron_mtp_rl.rollout.process_engine import ProcessEngine

    leader = True
    if dist.is_initialized():
        leader = dist.get_rank() == dist.get_process_group_ranks(parallel_state.get_model_parallel_group())[0]
    engine = ProcessEngine(
        asdict(run.model_args),
        lambda: gather_full_state(unwrap(run.model)),
        vocab_size=run.model_args.vocab_size,
        speculative=cfg.rollout.local_spec_decode,
        seed=cfg.seed,
        threads=torch.get_num_threads(),
        owner=leader,
        dtype=cfg.rollout.rollout_dtype,
        record_routes=engine_records_routes(cfg, run.model_args),
    )
    engine.sync_weights()
    return engine


def _ray_engine(cfg: RunConfig, run: Run, actor) -> RolloutEngine:
    import ray
    import torch.distributed as dist

    from megatron_mtp_rl.hf.mapping import gather_full_state
    from megatron_mtp_rl.models.mtp_forward import unwrap
    from megatron_mtp_rl.rollout.ray_engine import RayRolloutClient

    version = [0]

    def stage() -> tuple[Callable[[], None], dict]:
        """Gather full tensors now (collective on every rank), copied; ``send()`` (rank 0) hands them to the
        actor, later where the off-policy queue runs it behind the batch in generation."""
        version[0] += 1
        v, state = version[0], gather_full_state(unwrap(run.model))
        cpu = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            cpu = {k: t.detach().to("cpu", copy=True) for k, t in state.items()}

        def send() -> None:
            if cpu is not None:
                ray.get(actor.load_weights.remote(cpu, v))
                cpu.clear()

        return send, {"rollout/weight_version": float(v)}

    client = RayRolloutClient(actor, version_timeout_s=cfg.rollout.rollout_version_timeout)
    engine = StagedRemoteEngine(client, stage, name="ray")
    engine.sync_weights()
    return engine


def _sglang_engine(cfg: RunConfig, run: Run, ray_engines=None) -> RolloutEngine:
    from pathlib import Path

    import torch.distributed as dist

    from megatron_mtp_rl.cluster.weight_sync import WeightSync, default_flavour, export_hf, resync_engine
    from megatron_mtp_rl.hf.export import is_stage_sender
    from megatron_mtp_rl.rollout.sglang.engine import SGLangEngine
    from megatron_mtp_rl.rollout.sglang.external import ExternalEngines, parse_urls
    from megatron_mtp_rl.rollout.sglang.preflight import preflight
    from megatron_mtp_rl.rollout.sglang.server import SGLangSupervisor

    ro = cfg.rollout
    root = Path(ro.rollout_hf_dir or Path(cfg.ckpt.save or "runs") / "hf")
    flavour = ro.hf_flavour or default_flavour(run.model_args)
    launcher = not dist.is_initialized() or dist.get_rank() == 0
    external = ro.rollout_engine_urls is not None
    urls = [None]
    client = None
    if launcher and external:  # servers started elsewhere: health-checked, never started or stopped here
        ext = ExternalEngines(parse_urls(ro.rollout_engine_urls), startup_timeout_s=ro.rollout_startup_timeout).start()
        client = SGLangEngine(ext.generate_url, engine_urls=ext.engine_urls, supervisor=ext,
                              version_timeout_s=ro.rollout_version_timeout)  # fmt: skip
    elif launcher:
        from megatron_mtp_rl.rollout.sglang.defaults import exports_remote_code

        dtype = "bfloat16" if run.model_args.params_dtype == "bf16" else "float32"  # SGLang serves what we train
        server_cfg = _sglang_server_config(cfg, root, exports_remote_code(run.model_args, flavour), dtype)
        sup = SGLangSupervisor(server_cfg)
        ports = [] if ray_engines is not None else sup.ports()  # Ray: each engine actor picks a free one
        preflight(server_cfg.server_cmd, server_cfg.router_cmd if sup.use_router else None, ro.rollout_host, ports)
    if not external:
        init = export_hf(run.model, run.model_args, root / "init", flavour, ro.max_shard_size)
    if launcher and not external:
        if getattr(run.tokenizer, "path", None):  # SGLang loads its tokenizer (EOS ids) from the model dir
            from megatron_mtp_rl.rollout.tokenizer import copy_tokenizer_files

            copy_tokenizer_files(run.tokenizer.path, init)
        if ray_engines is not None:
            group = ray_engines.start(server_cfg)
            client = SGLangEngine(group.generate_url, engine_urls=group.engine_urls, supervisor=group,
                                  version_timeout_s=ro.rollout_version_timeout)  # fmt: skip
        else:
            client = SGLangEngine.launch(server_cfg, version_timeout_s=ro.rollout_version_timeout)
    if launcher:
        urls = [(client.generate_url, client.engine_urls)]
    if dist.is_initialized():
        dist.broadcast_object_list(urls, src=0)
    mp_leader = (
        not dist.is_initialized()
        or dist.get_rank() == dist.get_process_group_ranks(parallel_state.get_model_parallel_group())[0]
    )
    if client is None and (mp_leader or is_stage_sender()):  # each pipeline stage's sender pushes its own stage
        client = SGLangEngine(urls[0][0], engine_urls=urls[0][1], version_timeout_s=ro.rollout_version_timeout)
    sync = WeightSync(
        client, run.model, run.model_args, mode=ro.weight_sync_mode, bucket_bytes=ro.update_weight_buffer_size,
        export_dir=str(root / "sync"), flavour=flavour, engine_tp=ro.rollout_engine_tp,
        max_shard_size=ro.max_shard_size, master_address=_sender_address(ray_engines),
    )  # fmt: skip
    if client is not None and cfg.algo.use_rollout_routing_replay:  # R3: answers carry the routes
        pattern = run.model_args.moe_layer_pattern()
        moe = [i for i, on in enumerate(pattern) if on]
        client.route_shape = (len(pattern), run.model_args.moe_router_topk, moe, run.model_args.num_experts)
    if client is not None and client.supervisor is not None:
        client.supervisor.on_restart = lambda url: resync_engine(sync, url)
    if ro.weight_sync_mode == "disk":  # the export is the staged copy: the reload can wait for the batch in flight
        engine = StagedRemoteEngine(client, sync.stage_weights, name="sglang", push=sync)
    else:
        engine = RemoteEngine(client, sync, name="sglang")
    if ray_engines is not None and ray_engines.colocated:  # the engines share the trainers' GPUs: take turns
        from megatron_mtp_rl.cluster.colocated import ColocatedEngine
        from megatron_mtp_rl.cluster.offload import TrainerOffload

        barrier = dist.barrier if dist.is_initialized() else (lambda: None)
        engine = ColocatedEngine(engine, TrainerOffload(run.model, run.optimizer), client if launcher else None,
                                 barrier=barrier)  # fmt: skip
    if ray_engines is not None:  # a dead engine actor is put back in its bundle and re-synced (every rank)
        from megatron_mtp_rl.cluster.engine_recovery import RecoveringEngine
        from megatron_mtp_rl.train.metrics import print_progress

        return RecoveringEngine(engine, ray_engines if launcher else None, sync, log=print_progress)
    if external:
        engine.sync_weights()  # they loaded a model of their own: push this run's (weight version 1)
    return engine


def _sender_address(ray_engines) -> str | None:
    """Where this rank's update-group rendezvous listens, should it send a stage (``distributed`` sync).

    Under Ray, the IP of this trainer's own node (a stage's sender may be on any node); under torchrun
    None: ``weight_sync.rendezvous_host`` picks it from the engines' URLs at the first push.
    """
    if ray_engines is None:
        return None
    import ray

    return ray.util.get_node_ip_address()


def _sglang_server_config(cfg: RunConfig, root, remote_code: bool = False, dtype: str | None = None):
    """What rank 0 launches for ``--rollout-engine sglang`` (the model directory is ``root/init``):
    SGLang's venv and, on CPU, its CPU flags unless given (rollout/sglang/defaults.py)."""
    import shlex

    from megatron_mtp_rl.rollout.sglang import defaults
    from megatron_mtp_rl.rollout.sglang.server import SGLangServerConfig

    ro = cfg.rollout
    cpu = defaults.engine_on_cpu(ro.sglang_engine_flags)  # CPU: SGLang's CPU flags and environment
    kw = {
        "server_cmd": shlex.split(ro.rollout_server_cmd) if ro.rollout_server_cmd else defaults.default_server_cmd(),
        "router_cmd": shlex.split(ro.rollout_router_cmd) if ro.rollout_router_cmd else defaults.default_router_cmd(),
        "env": defaults.engine_env(cpu=cpu),
    }
    return SGLangServerConfig(
        model_path=str(root / "init"),
        num_engines=ro.rollout_num_engines,
        tp_size=ro.rollout_engine_tp,
        port=ro.rollout_base_port,
        router_port=ro.rollout_router_port,
        host=ro.rollout_host,
        engine_flags=defaults.engine_flags(
            list(ro.sglang_engine_flags)
            + (["--dtype", ro.rollout_dtype] if ro.rollout_dtype else [])
            + (["--enable-return-routed-experts"] if cfg.algo.use_rollout_routing_replay else []),
            cpu=cpu,
            remote_code=remote_code,
            dtype=dtype,
        ),
        router_flags=list(ro.sglang_router_flags),
        startup_timeout_s=ro.rollout_startup_timeout,
        log_dir=str(root / "logs"),
        **kw,
    )


@dataclass
class Rollout:
    """How a step gets its samples: the manager, the rollout function and the group filter."""

    manager: RolloutManager
    rollout_fn: Callable  # (manager, fetch, *, num_prompts, seed, group_filter, max_rounds) -> RolloutBatch
    group_filter: Callable | None  # (rewards, group_size) -> keep mask; None: no dynamic sampling
    scorer: object

    def close(self) -> None:
        self.scorer.close()


def build_rollout(cfg: RunConfig, run: Run, engine: RolloutEngine) -> Rollout:
    """Manager + reward scorer + ``--rollout-function`` / ``--dynamic-sampling-filter``."""
    ro, al = cfg.rollout, cfg.algo
    sampling = SamplingParams(
        temperature=ro.rollout_temperature,
        top_p=ro.rollout_top_p,
        max_new_tokens=ro.rollout_max_response_len,
        eos_id=run.tokenizer.eos_id,
        stop_ids=tuple(getattr(run.tokenizer, "stop_ids", ())),
    )
    try:
        scorer = build_scorer(ro.reward_fn, workers=ro.reward_workers, timeout_s=ro.reward_timeout)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    manager = RolloutManager(
        engine, run.tokenizer, scorer, n_samples=ro.n_samples_per_prompt, sampling=sampling, max_turns=ro.max_turns
    )
    rollout_fn = load_extension(ro.rollout_function, "--rollout-function") if ro.rollout_function else None
    group_filter = (
        load_extension(al.dynamic_sampling_filter, "--dynamic-sampling-filter") if al.dynamic_sampling else None
    )
    return Rollout(manager, rollout_fn or RolloutManager.rollout, group_filter, scorer)


def build_advantage_estimator(cfg: RunConfig) -> Estimator:
    """``--advantage-estimator``: a built-in name (rl/advantages.py:ESTIMATORS), or a dotted path to an
    ``Estimator`` or to a per-sample function ``fn(rewards, group_size, algo_cfg)``."""
    name = cfg.algo.advantage_estimator
    if name in ESTIMATORS:
        return ESTIMATORS[name]
    fn = load_extension(name, "--advantage-estimator")
    return fn if isinstance(fn, Estimator) else sample_estimator(fn)
