"""One RL step, as named phases read top to bottom:

    generate → score → (pack) → old/ref log-probs → advantages → (dump) → updates → weight sync → metrics

:func:`rl_step` calls them in that order; each phase is one function below, in the same order.
The update phase (:func:`train_step`) calls the OCC reduce visibly, right before ``optimizer.step()``.
With a critic (``gae``) the old-log-prob phase also scores its values, the advantages phase also writes
its targets (:func:`critic_targets`) and each update is followed by the critic's (:func:`updates`).

Everything a step does is determined by (seed, step, DP rank) and the data cursor, so a run
resumed from a checkpoint reproduces the metrics of an uninterrupted run.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.cluster.colocated import generation_phase
from megatron_mtp_rl.config import RunConfig
from megatron_mtp_rl.platform.device import collective_device, peak_memory_gb
from megatron_mtp_rl.rl.advantages import AdvantageInputs, Estimator, gae_returns, overlong_penalty, token_advantages
from megatron_mtp_rl.rl.loss import RLBatch, RLLoss, RLLossConfig, step_denominators
from megatron_mtp_rl.rl.metric_values import MAX_KIND, read
from megatron_mtp_rl.rl.occ import OCCEstimator
from megatron_mtp_rl.rollout.async_rollout import OneStepAhead
from megatron_mtp_rl.rollout.dump import RolloutDumper
from megatron_mtp_rl.rollout.engine import RolloutEngine
from megatron_mtp_rl.rollout.manager import RolloutBatch, Sample
from megatron_mtp_rl.rollout.partial import PartialRollout
from megatron_mtp_rl.rollout.reward_sandbox import check_step_rewards
from megatron_mtp_rl.train import faults, routing
from megatron_mtp_rl.train.builders import Reference, Rollout, Run
from megatron_mtp_rl.train.critic import Critic
from megatron_mtp_rl.train.microbatches import (  # noqa: F401 (build_micro_batches re-exported)
    balance_on,
    build_micro_batches,
    plan_minibatches,
    response_mask,
    same_shapes_on_every_rank,
)
from megatron_mtp_rl.train.optim import clip_and_step, param_norm, split_parameters
from megatron_mtp_rl.train.schedule import configure, forward_backward
from megatron_mtp_rl.train.throughput import throughput_metrics


@dataclass
class StepContext:
    """Everything one RL step reads; built once by ``train/loop.py`` from the builders."""

    cfg: RunConfig
    run: Run  # model, optimizer, scheduler, OCC, data source
    engine: RolloutEngine  # generates; sync_weights() after the updates
    rollout: Rollout  # manager + --rollout-function + --dynamic-sampling-filter
    advantage_fn: Estimator  # --advantage-estimator
    loss_cfg: RLLossConfig
    reference: Reference | None  # --kl-coef > 0
    dumper: RolloutDumper | None = None  # --rollout-dump-dir (logging rank only)
    ahead: OneStepAhead | None = None  # --async-rollout: the next step's batch, generated during this one
    critic: Critic | None = None  # --advantage-estimator gae
    teacher: Reference | None = None  # --advantage-estimator opd: the distillation teacher
    partial: PartialRollout | None = None  # --partial-rollout: the buffer of unfinished samples


def step_seed(seed: int, step: int, dp_rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + dp_rank * 104_729) % (2**62)


def rl_step(ctx: StepContext, step: int, cursor: int) -> tuple[dict, int]:
    """Run RL step ``step`` (1-based) from data position ``cursor``; (metrics, next cursor)."""
    faults.current_step = step
    t0 = time.perf_counter()
    batch, cursor = generate(ctx, step, cursor)
    # Every reward call failed (a broken reward function): stop before training on zeros.
    bm = batch.metrics
    stats = getattr(ctx.rollout.scorer, "stats", None)
    check_step_rewards(stats, bm.get("rollout/reward_errors", 0.0), bm.get("rollout/generated_samples", 0.0), step)
    raw, shaped, metrics = score(ctx, batch)
    t_train = time.perf_counter()
    spans: dict = {}
    # --balance-data deals samples to other DP ranks: their advantages go with them, computed here first.
    early = sample_advantages(ctx, batch.samples, shaped) if balance_on(ctx.cfg.optim) else None
    minibatches = pack_minibatches(ctx, batch.samples, early, step, spans=spans)
    old_and_ref_logprobs(ctx, minibatches)
    metrics.update(routing.agreement_metrics(ctx))
    adv = early if early is not None else advantages(ctx, shaped, spans)
    critic_targets(ctx, shaped, spans)
    dump_rollouts(ctx, step, batch.samples, adv, spans)
    per_update = [updates(ctx, m, step) for m in minibatches]
    metrics.update(average_updates(per_update))
    metrics.update(sync_weights(ctx))
    metrics.update(step_metrics(ctx, batch.samples, len(minibatches), t0, t_train))
    metrics.update(
        throughput_metrics(
            ctx.cfg, ctx.run.model_args, [mb for m in minibatches for mb in m], with_mtp=ctx.loss_cfg.runs_mtp,
            train_time=metrics["perf/train_time"], step_time=metrics["perf/step_time"],
        )
    )  # fmt: skip
    return metrics, cursor


# -- phase 1: generate (rewards are scored inside: the group filter needs them) ----------------
def generate(ctx: StepContext, step: int, cursor: int) -> tuple[RolloutBatch, int]:
    """This DP rank's groups of samples, with rewards; advances the shared data cursor.

    ``--async-rollout`` / ``--max-off-policy-steps K``: the batch was generated during step ``step - K``
    (rollout/async_rollout.py); step ``step + K``'s is queued here, on a thread, with the weights the engine
    holds once the jobs before it are done (θ_{step-1}). ``perf/rollout_wait_time``: how long this step
    waited for its batch.
    """
    dp = parallel_state.get_data_parallel_world_size()
    if ctx.ahead is None:
        with generation_phase(ctx.engine) as handoff:  # colocated: the engines' turn on the GPUs
            batch = on_mp_leader(ctx.engine, _rollout_fn(ctx, step, cursor, step - 1))
        batch.metrics.update(handoff)
        return batch, cursor + max_over_dp(batch.prompts_consumed) * dp
    ah, last = ctx.ahead, ctx.cfg.num_steps
    if ah.gen_cursor is None:
        ah.gen_cursor = cursor
    if not staged_push(ctx):  # every job is done (the push waited): count them all
        _settle(ctx, ah)
    while ah.next_step <= min(step + ah.depth - 1, last):  # the run's first step, or a resume without them
        b = ah.next_step
        ah.submit(b, step - 1, _leader_only(ctx.engine, _rollout_fn(ctx, b, _queued_cursor(ah, dp), step - 1)))
        ah.wait()
        _settle(ctx, ah)
    t = time.perf_counter()
    ah.wait(step)  # generated ahead: waits only when generation is behind
    waited = time.perf_counter() - t
    _settle(ctx, ah, step)
    consumed = ah.consumed(step)
    batch, lag = ah.take(step)
    cursor += consumed
    if step + ah.depth <= last:  # engine holds θ_{step-1}: batch step+K is K steps off-policy
        b = step + ah.depth
        ah.submit(b, step - 1, _leader_only(ctx.engine, _rollout_fn(ctx, b, _queued_cursor(ah, dp), step - 1)))
    batch.metrics.setdefault("rollout/policy_lag", float(lag))
    batch.metrics.setdefault("rollout/policy_lag_max", float(lag))
    batch.metrics.setdefault("rollout/stale_dropped", 0.0)
    batch.metrics["perf/rollout_wait_time"] = waited
    return batch, cursor


def _settle(ctx: StepContext, ah: OneStepAhead, upto: int | None = None) -> None:
    """Generated batches (up to step ``upto``: the ones every rank has waited for): every rank of the
    model-parallel group gets them, the data cursor counts them."""
    dp = parallel_state.get_data_parallel_world_size()
    for b in ah.unsettled():
        if upto is not None and b > upto:
            break
        batch = _broadcast_from_mp_leader(ctx.engine, ah.batches[b][1])
        ah.settle(b, batch, max_over_dp(batch.prompts_consumed) * dp)


def _queued_cursor(ah: OneStepAhead, dp: int) -> Callable[[], int]:
    """The data cursor of a queued batch, read when its generation starts (the batches before it are done by
    then, not necessarily settled: with one DP rank this rank's count is the settled one)."""
    return lambda: ah.cursor(lambda batch: batch.prompts_consumed * dp)


def staged_push(ctx: StepContext) -> bool:
    """Whether the weight push is queued behind the generation in flight instead of waiting for it: the engine
    takes a staged copy (the local engine's child process, the Ray actor, SGLang with disk sync) and one DP rank
    reads the data (the queued batch's cursor is this rank's own count)."""
    return (
        ctx.ahead is not None
        and hasattr(ctx.engine, "stage_weights")
        and parallel_state.get_data_parallel_world_size() == 1
    )


def _rollout_fn(
    ctx: StepContext, step: int, cursor: int | Callable[[], int], weights_step: int
) -> Callable[[], RolloutBatch]:
    """The ``--rollout-function`` call that generates step ``step``'s batch from ``cursor`` (or from what
    ``cursor()`` returns when the call starts).

    ``weights_step``: trainer steps done when the engine got the weights it generates with (partial
    rollouts number every token's weights with it)."""
    cfg = ctx.cfg
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    consumed = [0]
    start: list[int] = []

    def fetch(count: int):
        if not start:
            start.append(cursor() if callable(cursor) else cursor)
        idx = [start[0] + (consumed[0] + k) * dp + dp_rank for k in range(count)]
        consumed[0] += count
        return [p for i in idx for p in ctx.run.source.take(i, 1)]

    extra = {} if ctx.partial is None else {"version": weights_step, "train_version": step - 1}
    fn = ctx.rollout.rollout_fn if ctx.partial is None else ctx.partial
    return lambda: fn(
        ctx.rollout.manager,
        fetch,
        num_prompts=cfg.rollout.rollout_batch_size // dp,
        seed=step_seed(cfg.seed, step, dp_rank),
        group_filter=ctx.rollout.group_filter,
        max_rounds=cfg.algo.max_sampling_rounds,
        **extra,
    )


# -- phase 2: score (reward shaping, accuracy) ------------------------------------------------
def score(ctx: StepContext, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(raw rewards, shaped rewards, rollout metrics): DAPO's overlong penalty is the shaping."""
    al, ro = ctx.cfg.algo, ctx.cfg.rollout
    raw = torch.tensor([s.reward for s in batch.samples], dtype=torch.float32)
    shaped = raw.clone()
    if al.overlong_buffer_len:
        lengths = torch.tensor([len(s.response_ids) for s in batch.samples])
        shaped += overlong_penalty(
            lengths,
            max_len=ro.rollout_max_response_len,
            buffer_len=min(al.overlong_buffer_len, ro.rollout_max_response_len),
            penalty_factor=al.overlong_penalty_factor,
        )
    metrics = dict(batch.metrics)
    metrics["rollout/accuracy"] = float((raw >= 1.0 - 1e-6).float().mean())
    if hasattr(ctx.run.source, "skipped"):
        metrics["data/skipped_rows"] = float(ctx.run.source.skipped)
    metrics["rollout/reward_mean"] = float(shaped.mean())
    return raw, shaped, metrics


# -- phase 3: pack ----------------------------------------------------------------------------
def pack_minibatches(
    ctx: StepContext, samples: list[Sample], adv: torch.Tensor | None, step: int, spans: dict | None = None
) -> list[list[RLBatch]]:
    """Shuffle this rank's samples and cut them into mini-batches of micro-batches.

    ``adv``: per-sample advantages, or None for zeros (:func:`advantages` writes them in later).

    ``spans`` (optional) receives, per sample index, where its response sits: (micro-batch, row,
    first, end) in the label frame — what the rollout dump reads the trainer's log-probs from.
    """
    cfg = ctx.cfg
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    adv = torch.zeros(len(samples)) if adv is None else adv
    if cfg.optim.use_dynamic_batch_size or balance_on(cfg.optim):  # by tokens (train/microbatches.py)
        seed = step_seed(cfg.seed, step, 0 if balance_on(cfg.optim) else dp_rank) + 1
        return plan_minibatches(cfg, samples, adv, seed, spans)
    order = list(range(len(samples)))
    random.Random(step_seed(cfg.seed, step, dp_rank) + 1).shuffle(order)
    per_step = cfg.optim.global_batch_size // dp
    pad_rows = same_shapes_on_every_rank(cfg)
    out = []
    for s in range(0, len(order), per_step):
        ids = order[s : s + per_step]
        out.append(
            build_micro_batches(
                [samples[i] for i in ids],
                [float(adv[i]) for i in ids],
                cfg.optim.micro_batch_size,
                cfg.data.seq_length,
                pad_rows,
                keys=ids,
                spans=spans,
            )
        )
    return out


# -- phase 4: old and reference log-probs -----------------------------------------------------
def old_and_ref_logprobs(ctx: StepContext, minibatches: list[list[RLBatch]]) -> None:
    """θ_old scores every micro-batch (main and, when trained, MTP heads); the reference and the critic too."""
    all_mbs = [mb for m in minibatches for mb in m]
    with routing.old_pass(ctx):  # R3 / R2: the routes this step's passes replay (train/routing.py)
        compute_old_logprobs(ctx.run.model, all_mbs, with_mtp=ctx.loss_cfg.regime.runs_mtp)
        if ctx.reference is not None:
            ctx.reference.score(all_mbs)
    if ctx.critic is not None:
        for mb, values in zip(all_mbs, ctx.critic.values(all_mbs)):
            mb.values = values
    if ctx.teacher is not None:
        ctx.teacher.score(all_mbs)


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


# -- phase 4b: advantages (token-level estimators read the log-probs just computed) -----------
def advantages(ctx: StepContext, shaped: torch.Tensor, spans: dict) -> torch.Tensor | None:
    """The ``--advantage-estimator``'s advantages, written into the packed micro-batches.

    Returns them per response token ``[N, T]`` (sample ``i``'s response in row ``i``, zero on
    untrained tokens). Computed on the last pipeline stage only: the loss, and the log-probs and
    values an estimator reads, live there (other stages return None).
    """
    if not parallel_state.is_pipeline_last_stage():
        return None
    where = [spans[i] for i in range(len(shaped))]
    x = advantage_inputs(ctx, shaped, where)
    missing = [n for n in ctx.advantage_fn.needs if getattr(x, n) is None]
    if missing:
        raise ValueError(f"--advantage-estimator {ctx.cfg.algo.advantage_estimator} needs {', '.join(missing)}")
    adv = token_advantages(ctx.advantage_fn(x), x.mask)
    for i, (mb, row, a, b) in enumerate(where):
        mb.advantages[row, a:b] = adv[i, : b - a]
    return adv


def critic_targets(ctx: StepContext, shaped: torch.Tensor, spans: dict) -> None:
    """With a critic: its regression targets (GAE returns, from the advantages' inputs) into the micro-batches."""
    if ctx.critic is None or not parallel_state.is_pipeline_last_stage():
        return
    where = [spans[i] for i in range(len(shaped))]
    returns = gae_returns(advantage_inputs(ctx, shaped, where))
    for i, (mb, row, a, b) in enumerate(where):
        if mb.returns is None:
            mb.returns = torch.zeros_like(mb.advantages)
        mb.returns[row, a:b] = returns[i, : b - a]


def advantage_inputs(ctx: StepContext, shaped: torch.Tensor, where: list[tuple]) -> AdvantageInputs:
    """What an estimator reads, in the response frame: mask, and every score the micro-batches hold."""
    x = AdvantageInputs(
        rewards=shaped,
        group_size=ctx.cfg.rollout.n_samples_per_prompt,
        algo=ctx.cfg.algo,
        mask=response_frame(where, "loss_mask").bool(),
        dp_group=parallel_state.get_data_parallel_group(with_context_parallel=True),
    )
    for name in ("old_logprobs", "ref_logprobs", "values", "teacher_logprobs"):
        if where and all(getattr(mb, name, None) is not None for mb, *_ in where):
            setattr(x, name, response_frame(where, name))
    return x


def sample_advantages(ctx: StepContext, samples: list[Sample], shaped: torch.Tensor) -> torch.Tensor:
    """Per-sample advantages before packing (``--balance-data``: whole groups are on this rank only now).

    Only an estimator of one value per sample that reads no model scores can run here: config.py refuses
    the others with ``--balance-data``.
    """
    longest = max((len(s.response_ids) for s in samples), default=0)
    mask = torch.zeros((len(samples), longest), dtype=torch.bool)
    for i, s in enumerate(samples):
        mask[i, : len(s.response_ids)] = response_mask(s) if s.loss_mask is not None else True
    x = AdvantageInputs(shaped, ctx.cfg.rollout.n_samples_per_prompt, ctx.cfg.algo, mask)
    adv = ctx.advantage_fn(x)
    if ctx.advantage_fn.needs or adv.dim() != 1:
        raise ValueError(
            f"--advantage-estimator {ctx.cfg.algo.advantage_estimator} gives per-token advantages: "
            "not with --balance-data (add --no-balance-data)"
        )
    return adv


def response_frame(where: list[tuple], name: str) -> torch.Tensor:
    """``[N, T]`` on the CPU: per sample, the packed tensor ``name`` over its response span (right padded
    with 0). The CPU, like the rewards and the packed batches: log-probs computed on a GPU come over once
    per micro-batch."""
    t = max((b - a for _, _, a, b in where), default=0)
    on_cpu: dict[int, torch.Tensor] = {}
    for mb, *_ in where:
        if id(mb) not in on_cpu:
            on_cpu[id(mb)] = getattr(mb, name).detach().cpu()
    first = next(iter(on_cpu.values()), torch.zeros(0))
    out = torch.zeros((len(where), t), dtype=first.dtype)
    for i, (mb, row, a, b) in enumerate(where):
        out[i, : b - a] = on_cpu[id(mb)][row, a:b]
    return out


def dump_rollouts(ctx: StepContext, step: int, samples: list[Sample], adv: torch.Tensor | None, spans: dict) -> None:
    """``--rollout-dump-dir``: the first samples with reward, advantage (mean over the trained tokens) and
    the rollout-vs-trainer log-prob gap (θ_old's log-probs of the same response tokens, just computed)."""
    d = ctx.dumper
    if d is None or not d.active or adv is None:
        return
    n = min(d.n, len(samples))
    trainer, per_sample = [], []
    for i in range(n):
        mb, row, a, b = spans.get(i, (None, 0, 0, 0))  # --balance-data: maybe trained on another rank
        lp = getattr(mb, "old_logprobs", None)
        trainer.append(lp[row, a:b].tolist() if lp is not None else None)
        if adv.dim() == 1:  # per sample (--balance-data)
            per_sample.append(float(adv[i]))
            continue
        m = mb.loss_mask[row, a:b]
        per_sample.append(float(adv[i, : b - a][m].mean()) if m.any() else 0.0)
    d.dump(step, samples[:n], per_sample, trainer)


# -- phase 5: updates -----------------------------------------------------------------------------
def updates(ctx: StepContext, micro_batches: list[RLBatch], step: int) -> dict:
    """The policy's update (none during ``--critic-warmup-steps``), then the critic's, on one mini-batch."""
    metrics = {} if step <= ctx.cfg.algo.critic_warmup_steps else update_and_schedule(ctx, micro_batches)
    if ctx.critic is not None:
        metrics.update(update_critic(ctx, micro_batches))
    return metrics


def update_critic(ctx: StepContext, micro_batches: list[RLBatch]) -> dict:
    """One critic step on the value loss (targets: ``returns``; clip around ``values``)."""
    results, norms, stepped = ctx.critic.update(micro_batches)
    metrics = {"critic/grad_norm": norms.main, "critic/skipped_steps": float(not stepped)}
    metrics.update(reduce_metrics(results, parallel_state.get_data_parallel_group(with_context_parallel=True)))
    return metrics


def update_and_schedule(ctx: StepContext, micro_batches: list[RLBatch]) -> dict:
    """One optimizer update on a mini-batch, then one LR-scheduler step."""
    r, op = ctx.run, ctx.cfg.optim
    metrics = train_step(
        r.model, r.optimizer, micro_batches, ctx.loss_cfg, r.occ, clip_grad=op.clip_grad, clip_grad_mtp=op.clip_grad_mtp
    )
    r.scheduler.step(increment=1)
    return metrics


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
    """forward/backward → OCC reduce → clip (main and MTP apart) → ``optimizer.step()``.

    Non-finite gradients skip ``optimizer.step()`` on every rank (grad norms are
    collective, so all ranks agree) and count ``train/skipped_steps``.
    """
    regime = loss_config.regime
    num_depths = (model.config.mtp_num_layers or 0) if loss_config.runs_mtp else 0  # regime or head loss
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    den = step_denominators(micro_batches, num_depths, group=dp_group)
    loss_fn = RLLoss(loss_config, den, occ, mtp_coef_override=mtp_coef_override)
    if faults.active("nan_loss"):
        loss_fn = _poisoned(loss_fn)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    results = forward_backward(model, micro_batches, loss_fn, **loss_fn.forward_kwargs())
    # OCC: the statistics the loss accumulated over this mini-batch are all-reduced over DP and
    # λ for the NEXT update is computed (every DP rank of the last stage gets the same λ).
    if occ is not None and parallel_state.is_pipeline_last_stage():
        occ.reduce()
    stepped, norms = clip_and_step(model, optimizer, clip_grad, clip_grad if clip_grad_mtp is None else clip_grad_mtp)
    skipped = not stepped
    metrics: dict[str, float] = {}
    if parallel_state.is_pipeline_last_stage():
        metrics.update(reduce_metrics(results, dp_group))
        if occ is not None and regime.runs_mtp:
            metrics.update(occ.last)
    metrics["train/grad_norm"] = norms.main
    metrics["train/grad_norm_mtp"] = norms.mtp
    metrics["train/skipped_steps"] = float(skipped)
    return metrics


def attach_occ(model: torch.nn.Module, occ: OCCEstimator | None = None) -> None:
    """Deprecated: install megatron's grad finalisation; :func:`train_step` now calls the OCC reduce."""
    configure(model)


def _poisoned(loss_fn):
    """Fault injection: the same loss times NaN (gradients become NaN everywhere)."""

    def fn(batch, out):
        loss, metrics = loss_fn(batch, out)
        return loss * float("nan"), metrics

    fn.forward_kwargs = loss_fn.forward_kwargs
    return fn


def reduce_metrics(per_microbatch: list[dict], group=None) -> dict[str, float]:
    """Σ (sum, count, is_mean) over micro-batches and DP ranks (``rl/metric_values.py``); a mean that
    counted nothing is left out."""
    if not per_microbatch:
        return {}
    keys = sorted(per_microbatch[0])
    dev = collective_device(group)
    rows = [torch.stack([m[k].to(dev) for m in per_microbatch]).double() for k in keys]
    t = torch.stack([r.sum(0) for r in rows])
    is_max = torch.tensor([bool(r[0, 2] == MAX_KIND) for r in rows], device=dev)
    t_max = torch.stack([r[:, 0].max() for r in rows])  # maxima (rl/metric_values.py:maximum)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
        dist.all_reduce(t_max, op=dist.ReduceOp.MAX, group=group)
    t[is_max, 0], t[is_max, 2] = t_max[is_max], MAX_KIND
    out = {}
    for k, (s, c, is_mean) in zip(keys, t.tolist()):
        value = read(s, c, is_mean)
        if value is not None:
            out[k] = value
    return out


def average_updates(per_update: list[dict]) -> dict:
    """Mean over the step's optimizer updates; λ and event counters: the last value."""
    out = {}
    last_only = ("occ/lambda_", "occ/guard_events", "occ/skipped_updates")
    for k in per_update[0]:
        vals = [u[k] for u in per_update if k in u]
        if k.startswith(last_only):
            out[k] = vals[-1]
        elif k in ("train/skipped_steps", "critic/skipped_steps"):
            out[k] = float(sum(vals))
        elif k.endswith("_max"):
            out[k] = max(vals)
        else:
            finite = [v for v in vals if v == v]
            out[k] = sum(finite) / len(finite) if finite else float("nan")
    return out


# -- phase 6: weight sync ---------------------------------------------------------------------
def sync_weights(ctx: StepContext) -> dict:
    """Push the updated weights to the engine (collective; a no-op for the local engine).

    ``--async-rollout``: after the next batch, generated meanwhile with the previous weights, is done; where
    the engine takes a staged copy (:func:`staged_push`) the push is queued behind that batch and the step
    goes on.
    """
    staged = staged_push(ctx)
    if ctx.ahead is not None and not staged:
        ctx.ahead.wait()
    if not ctx.engine.remote:
        return ctx.engine.sync_weights()
    t = time.perf_counter()
    if staged:
        push, metrics = ctx.engine.stage_weights()
        ctx.ahead.after(push)
    else:
        metrics = dict(ctx.engine.sync_weights())
    metrics["perf/weight_sync_time"] = time.perf_counter() - t
    return metrics


# -- phase 7: metrics -------------------------------------------------------------------------
def step_metrics(ctx: StepContext, samples: list[Sample], updates: int, t0: float, t_train: float) -> dict:
    """Parameter norms, LR and throughput (the phases above add their own metrics)."""
    r = ctx.run
    main, mtp = split_parameters(r.gpt)
    m = {
        "train/param_norm_main": param_norm(main),
        "train/param_norm_mtp": param_norm(mtp),
        "train/lr": r.optimizer.param_groups[0]["lr"],
        "train/updates": float(updates),
        "perf/train_time": time.perf_counter() - t_train,
        "perf/step_time": time.perf_counter() - t0,
    }
    tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples)
    m["perf/tokens_per_s"] = tokens * parallel_state.get_data_parallel_world_size() / max(m["perf/step_time"], 1e-9)
    peak = peak_memory_gb()
    if peak is not None:  # GPU: this rank's CUDA allocator peak since start
        m["perf/peak_memory_gb"] = peak
    return m


# -- helpers shared by the phases and evaluation ----------------------------------------------
def on_mp_leader(engine: RolloutEngine, fn):
    """Local engine: every rank runs ``fn`` (generation is a collective forward).

    Remote engine: only the first rank of each model-parallel (TP×PP) group talks to it; the
    result is broadcast to the rest of its group, so a sample is generated once.
    """
    return _broadcast_from_mp_leader(engine, _leader_only(engine, fn)())


def _mp_ranks(engine: RolloutEngine) -> list[int]:
    """The model-parallel group's ranks when a remote engine is asked by its first rank only."""
    if not engine.remote or not dist.is_initialized():
        return []
    ranks = dist.get_process_group_ranks(parallel_state.get_model_parallel_group())
    return ranks if len(ranks) > 1 else []


def _leader_only(engine: RolloutEngine, fn):
    """``fn`` on the rank that asks the engine; a no-op returning None on the rest of its group."""
    ranks = _mp_ranks(engine)
    return fn if not ranks or dist.get_rank() == ranks[0] else (lambda: None)


def _broadcast_from_mp_leader(engine: RolloutEngine, value):
    ranks = _mp_ranks(engine)
    if not ranks:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=ranks[0], group=parallel_state.get_model_parallel_group())
    return box[0]


def max_over_dp(x: int) -> int:
    t = torch.tensor([x], dtype=torch.long, device=collective_device(parallel_state.get_data_parallel_group()))
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=parallel_state.get_data_parallel_group())
    return int(t.item())
