"""The RL loop: rollout → rewards → advantages → old log-probs → mini-batch updates → metrics.

Everything a step does is determined by (seed, step, DP rank) and the data cursor, so a run
resumed from a checkpoint reproduces the metrics of an uninterrupted run.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.models import pack_sequences
from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.models.mtp_forward import forward_logprobs
from megatron_mtp_rl.rl import RLBatch, RLLossConfig, grpo_advantages, overlong_penalty
from megatron_mtp_rl.rollout.local_engine import LocalEngine
from megatron_mtp_rl.rollout.manager import RolloutManager, Sample
from megatron_mtp_rl.rollout.reward_sandbox import build_scorer
from megatron_mtp_rl.train import faults
from megatron_mtp_rl.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    read_trainer_state,
    save_checkpoint,
)
from megatron_mtp_rl.train.metrics import MetricsWriter, print_progress, progress_line
from megatron_mtp_rl.train.optim import param_norm, split_parameters
from megatron_mtp_rl.train.setup import ConfigError, Run, build_run
from megatron_mtp_rl.train.step import compute_old_logprobs, train_step


def step_seed(seed: int, step: int, dp_rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + dp_rank * 104_729) % (2**62)


def loss_config(args) -> RLLossConfig:
    return RLLossConfig(
        eps_clip=args.eps_clip,
        eps_clip_high=args.eps_clip_high,
        eps_clip_c=args.eps_clip_c,
        loss_agg_mode=args.loss_agg_mode,
        ratio_type=args.ratio_type,
        kl_coef=args.kl_coef,
        kl_type=args.kl_type,
        entropy_coef=args.entropy_coef,
        mtp_regime=args.mtp_regime,
        mtp_loss_coef=args.mtp_loss_coef,
    )


def is_logging_rank() -> bool:
    return (
        parallel_state.is_pipeline_last_stage()
        and parallel_state.get_data_parallel_rank() == 0
        and parallel_state.get_tensor_model_parallel_rank() == 0
    )


def build_micro_batches(samples: list[Sample], advantages: list[float], mbs: int, seq_length: int, pad_rows: bool):
    """Pack samples (``mbs`` per micro-batch) into RLBatches with per-token advantages."""
    out = []
    for s in range(0, len(samples), mbs):
        chunk = samples[s : s + mbs]
        seqs = [(x.prompt_ids, x.response_ids) for x in chunk]
        batch, where = pack_sequences(seqs, seq_length, rows=mbs if pad_rows else None)
        adv = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        for x, a, (row, start, n) in zip(chunk, advantages[s : s + mbs], where):
            adv[row, start + len(x.prompt_ids) - 1 : start + n - 1] = a
        out.append(RLBatch(**batch.__dict__, advantages=adv))
    return out


class Trainer:
    def __init__(self, run: Run, engine=None, weight_push=None):
        self.run = run
        a = run.args
        self.args = a
        self.dp = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_group = parallel_state.get_data_parallel_group()
        self.remote = a.rollout_engine != "local" or engine is not None
        self.engine = engine
        self.weight_sync = None
        self._external = engine is not None  # e.g. a Ray rollout actor; weights go via weight_push
        self._weight_push = weight_push
        self._push_version = 0
        if engine is None and not self.remote:
            self.engine = LocalEngine(run.gpt, vocab_size=run.tokenizer.vocab_size, speculative=a.local_spec_decode)
        self.sampling = SamplingParams(
            temperature=a.rollout_temperature,
            top_p=a.rollout_top_p,
            max_new_tokens=a.rollout_max_response_len,
            eos_id=run.tokenizer.eos_id,
        )
        self.scorer = build_scorer(a.reward_fn, workers=a.reward_workers, timeout_s=a.reward_timeout)
        self.manager = RolloutManager(
            self.engine, run.tokenizer, self.scorer, n_samples=a.n_samples_per_prompt, sampling=self.sampling
        )
        self.loss_cfg = loss_config(a)
        self.step = 0
        self.cursor = 0
        self.ref_model = None
        if a.kl_coef > 0:
            import copy

            self.ref_model = copy.deepcopy(run.gpt).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)

    # -- state -----------------------------------------------------------------------
    def trainer_state(self) -> dict:
        r = self.run
        return {
            "step": self.step,
            "cursor": self.cursor,
            "occ": r.occ.state_dict() if r.occ else None,
            "scheduler": r.scheduler.state_dict(),
            "model_args": asdict(r.model_args),
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "mtp_regime": self.args.mtp_regime,
        }

    def maybe_load(self) -> None:
        a, r = self.args, self.run
        if not a.load:
            return
        path = latest_checkpoint(a.load)
        if path is None:
            raise ConfigError(f"--load {a.load}: no checkpoint there (no latest_checkpointed_iteration.txt)")
        saved = read_trainer_state(path)["model_args"]
        mine = asdict(r.model_args)
        diff = {k: (saved.get(k), mine[k]) for k in mine if k not in ("seq_length",) and saved.get(k) != mine[k]}
        if diff:
            lines = ", ".join(f"{k}: checkpoint {v[0]} vs run {v[1]}" for k, v in sorted(diff.items()))
            raise ConfigError(f"--load {path}: the checkpoint has a different model shape ({lines})")
        try:
            _, state = load_checkpoint(a.load, r.model, None if a.finetune else r.optimizer)
        except ValueError as e:
            if "parameter group" not in str(e):
                raise
            raise ConfigError(
                f"--load {path}: the checkpoint's optimizer parameter groups differ from this run's (changed "
                "--lr, --min-lr or --weight-decay?). Resume with the original values, or add --finetune to load "
                f"the weights only. megatron-core said: {str(e).splitlines()[0]}"
            ) from None
        if a.finetune:
            return
        self.step = state["step"]
        self.cursor = state["cursor"]
        r.scheduler.load_state_dict(state["scheduler"])
        if r.occ and state.get("occ"):
            r.occ.load_state_dict(state["occ"])
        if state.get("rng"):
            random.setstate(state["rng"]["python"])
            np.random.set_state(state["rng"]["numpy"])
            torch.set_rng_state(state["rng"]["torch"])

    # -- one RL step -------------------------------------------------------------------
    def _fetch_factory(self):
        consumed = [0]

        def fetch(count: int):
            idx = [self.cursor + (consumed[0] + k) * self.dp + self.dp_rank for k in range(count)]
            consumed[0] += count
            return [p for i in idx for p in self.run.source.take(i, 1)]

        return fetch

    def _max_over_dp(self, x: int) -> int:
        t = torch.tensor([x], dtype=torch.long)
        if dist.is_initialized() and self.dp > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.dp_group)
        return int(t.item())

    def rl_step(self) -> dict:
        a, r = self.args, self.run
        step = self.step + 1
        faults.current_step = step
        t0 = time.perf_counter()
        per_rank = a.rollout_batch_size // self.dp
        batch = self._on_mp_leader(
            lambda: self.manager.rollout(
                self._fetch_factory(),
                num_prompts=per_rank,
                seed=step_seed(a.seed, step, self.dp_rank),
                dynamic_sampling=a.dynamic_sampling,
                max_rounds=a.max_sampling_rounds,
            )
        )
        self.cursor += self._max_over_dp(batch.prompts_consumed) * self.dp
        samples = batch.samples
        raw = torch.tensor([s.reward for s in samples], dtype=torch.float32)
        shaped = raw.clone()
        if a.overlong_buffer_len:
            lengths = torch.tensor([len(s.response_ids) for s in samples])
            shaped += overlong_penalty(
                lengths,
                max_len=a.rollout_max_response_len,
                buffer_len=min(a.overlong_buffer_len, a.rollout_max_response_len),
                penalty_factor=a.overlong_penalty_factor,
            )
        adv = grpo_advantages(shaped, a.n_samples_per_prompt, normalize_std=not a.no_grpo_std_normalization)
        metrics = dict(batch.metrics)
        metrics["rollout/accuracy"] = float((raw >= 1.0 - 1e-6).float().mean())
        if hasattr(r.source, "skipped"):
            metrics["data/skipped_rows"] = float(r.source.skipped)
        metrics["rollout/reward_mean"] = float(shaped.mean())

        t_train = time.perf_counter()
        order = list(range(len(samples)))
        random.Random(step_seed(a.seed, step, self.dp_rank) + 1).shuffle(order)
        per_step = a.global_batch_size // self.dp
        pad_rows = a.pipeline_model_parallel_size > 1
        minibatches = []
        for s in range(0, len(order), per_step):
            ids = order[s : s + per_step]
            minibatches.append(
                build_micro_batches(
                    [samples[i] for i in ids],
                    [float(adv[i]) for i in ids],
                    a.micro_batch_size,
                    a.seq_length,
                    pad_rows,
                )
            )
        regime = self.loss_cfg.regime
        all_mbs = [mb for m in minibatches for mb in m]
        compute_old_logprobs(r.model, all_mbs, with_mtp=regime.runs_mtp)
        if self.ref_model is not None:
            with torch.no_grad():
                for mb in all_mbs:
                    mb.ref_logprobs = forward_logprobs(self.ref_model, mb, with_mtp=False).logprobs
        per_update = []
        for m in minibatches:
            per_update.append(
                train_step(
                    r.model,
                    r.optimizer,
                    m,
                    self.loss_cfg,
                    r.occ,
                    clip_grad=a.clip_grad,
                    clip_grad_mtp=a.clip_grad_mtp,
                )
            )
            r.scheduler.step(increment=1)
        metrics.update(_average_updates(per_update))
        if self.weight_sync is not None:
            t_sync = time.perf_counter()
            metrics.update(self.weight_sync())
            metrics["perf/weight_sync_time"] = time.perf_counter() - t_sync
        main, mtp = split_parameters(r.gpt)
        metrics["train/param_norm_main"] = param_norm(main)
        metrics["train/param_norm_mtp"] = param_norm(mtp)
        metrics["train/lr"] = r.optimizer.param_groups[0]["lr"]
        metrics["train/updates"] = float(len(minibatches))
        metrics["perf/train_time"] = time.perf_counter() - t_train
        metrics["perf/step_time"] = time.perf_counter() - t0
        tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in samples) * self.dp
        metrics["perf/tokens_per_s"] = tokens / max(metrics["perf/step_time"], 1e-9)
        self.step = step
        return metrics

    # -- evaluation --------------------------------------------------------------------
    def evaluate(self, prompts=None) -> dict:
        """Greedy accuracy on the held-out prompts (or ``prompts``), split over DP ranks."""
        prompts = self.run.source.eval_prompts() if prompts is None else prompts
        if not prompts:
            return {}
        mine = prompts[self.dp_rank :: self.dp]
        correct = 0.0
        if mine:
            greedy = SamplingParams(
                temperature=0.0,
                max_new_tokens=self.sampling.max_new_tokens,
                eos_id=self.sampling.eos_id,
            )

            def score():
                samples, _ = self.manager.generate_groups(mine, seed=0, params=greedy, n=1)
                return sum(float(s.reward >= 1.0 - 1e-6) for s in samples)

            correct = self._on_mp_leader(score)
        t = torch.tensor([correct, float(len(mine))], dtype=torch.float64)
        if dist.is_initialized() and self.dp > 1:
            dist.all_reduce(t, group=self.dp_group)
        return {"eval/accuracy": float(t[0] / max(t[1], 1.0)), "eval/num_prompts": float(t[1])}

    # -- remote engines ----------------------------------------------------------------
    def _on_mp_leader(self, fn):
        """Local engine: every rank runs ``fn`` (generation is a collective forward).

        Remote engine: only the first rank of each model-parallel (TP×PP) group talks to
        SGLang; the result is broadcast to the rest of its group, so a sample is generated once.
        """
        if not self.remote:
            return fn()
        group = parallel_state.get_model_parallel_group()
        ranks = dist.get_process_group_ranks(group) if dist.is_initialized() else [0]
        if len(ranks) == 1:
            return fn()
        box = [fn() if dist.get_rank() == ranks[0] else None]
        dist.broadcast_object_list(box, src=ranks[0], group=group)
        return box[0]

    def _push_weights(self) -> dict:
        self._push_version += 1
        return self._weight_push(self.run.model, self._push_version)

    def start_engine(self) -> None:
        """SGLang: export the current weights, launch engines (global rank 0), connect, sync.

        An external engine (Ray rollout actor) gets the current weights pushed instead.
        """
        if self._external:
            if self._weight_push is not None:
                self._push_weights()
                self.weight_sync = self._push_weights
            return
        if not self.remote or self.engine is not None:
            return
        import shlex
        from pathlib import Path

        from megatron_mtp_rl.rollout.sglang_engine import SGLangEngine
        from megatron_mtp_rl.rollout.sglang_server import SGLangServerConfig
        from megatron_mtp_rl.train.weight_sync import WeightSync, default_flavour, export_hf, resync_engine

        a, r = self.args, self.run
        root = Path(a.rollout_hf_dir or Path(a.save or "runs") / "hf")
        flavour = a.hf_flavour or default_flavour(r.model_args)
        init = export_hf(r.model, r.model_args, root / "init", flavour)
        urls = [None]
        engine = None
        if not dist.is_initialized() or dist.get_rank() == 0:
            kw = {}
            if a.rollout_server_cmd:
                kw["server_cmd"] = shlex.split(a.rollout_server_cmd)
            if a.rollout_router_cmd:
                kw["router_cmd"] = shlex.split(a.rollout_router_cmd)
            cfg = SGLangServerConfig(
                model_path=str(init),
                num_engines=a.rollout_num_engines,
                tp_size=a.rollout_engine_tp,
                port=a.rollout_base_port,
                router_port=a.rollout_router_port,
                host=a.rollout_host,
                engine_flags=list(a.sglang_engine_flags),
                router_flags=list(a.sglang_router_flags),
                startup_timeout_s=a.rollout_startup_timeout,
                log_dir=str(root / "logs"),
                **kw,
            )
            engine = SGLangEngine.launch(cfg)
            urls = [(engine.generate_url, engine.engine_urls)]
        if dist.is_initialized():
            dist.broadcast_object_list(urls, src=0)
        mp_leader = (
            not dist.is_initialized()
            or dist.get_rank() == dist.get_process_group_ranks(parallel_state.get_model_parallel_group())[0]
        )
        if engine is None and mp_leader:
            engine = SGLangEngine(urls[0][0], engine_urls=urls[0][1])
        self.engine = engine
        self.manager.engine = engine
        self.weight_sync = WeightSync(
            engine, r.model, r.model_args, mode=a.weight_sync_mode, bucket_bytes=a.update_weight_buffer_size,
            export_dir=str(root / "sync"), flavour=flavour, engine_tp=a.rollout_engine_tp,
            num_engines=a.rollout_num_engines, master_address=a.rollout_host,
        )  # fmt: skip
        if engine is not None and engine.supervisor is not None:
            sync = self.weight_sync
            engine.supervisor.on_restart = lambda url: resync_engine(sync, url)

    def close_engine(self) -> None:
        if self.remote and self.engine is not None and not self._external:
            self.engine.close()
            self.engine = None

    # -- the loop ----------------------------------------------------------------------
    def train(self) -> list[dict]:
        a, r = self.args, self.run
        self.maybe_load()
        self.start_engine()
        writer = MetricsWriter(a.metrics_jsonl, a.tensorboard_dir, enabled=is_logging_rank(), resume_step=self.step)
        history = []
        try:
            if self.step == 0:
                m0 = self.evaluate()
                writer.log(0, m0)
                history.append({"step": 0, **m0})
                if not a.quiet and is_logging_rank() and m0:
                    print_progress(f"step 0/{a.num_steps} | eval {m0['eval/accuracy']:.3f} (before RL)")
            while self.step < a.num_steps:
                m = self.rl_step()
                if self.step % a.eval_interval == 0 or self.step == a.num_steps:
                    m.update(self.evaluate())
                if a.save and a.save_interval and self.step % a.save_interval == 0:
                    save_checkpoint(a.save, self.step, r.model, r.optimizer, self.trainer_state(), a.keep_last)
                writer.log(self.step, m)
                history.append({"step": self.step, **m})
                if not a.quiet and is_logging_rank():
                    print_progress(progress_line(self.step, a.num_steps, m, a.mtp_regime))
            if a.save and not (a.save_interval and self.step % a.save_interval == 0):
                save_checkpoint(a.save, self.step, r.model, r.optimizer, self.trainer_state(), a.keep_last)
        finally:
            writer.close()
            self.scorer.close()
            self.close_engine()
        return history


def _average_updates(per_update: list[dict]) -> dict:
    """Mean over the step's optimizer updates; λ and event counters: the last value."""
    out = {}
    last_only = ("occ/lambda_", "occ/guard_events")
    for k in per_update[0]:
        vals = [u[k] for u in per_update if k in u]
        if k.startswith(last_only):
            out[k] = vals[-1]
        elif k == "train/skipped_steps":
            out[k] = float(sum(vals))
        else:
            finite = [v for v in vals if v == v]
            out[k] = sum(finite) / len(finite) if finite else float("nan")
    return out


def run_training(args, engine=None, weight_push=None) -> list[dict]:
    """Build the run and train. ``engine``/``weight_push``: an external rollout engine (Ray)."""
    run = build_run(args)
    return Trainer(run, engine=engine, weight_push=weight_push).train()
