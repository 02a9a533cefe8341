"""Partial rollouts with over-sampling (``--partial-rollout``, ``--over-sampling-batch-size``).

Reasoning RL waits for its longest generations. Here a step keeps ``--over-sampling-batch-size``
groups in flight and stops decoding once ``--rollout-batch-size`` groups are complete (and, with
dynamic sampling, kept by the filter); the unfinished samples stay in a buffer with their tokens,
log-probs, the weight version of every token and (R3) the MoE routes recorded so far, and continue
at the next step with the weights of then. A group trains only when all its samples are done;
every sample trains at most once.

Determinism: a step's buffer, prompts and seeds are fixed by the run, so the buffer is saved
with a checkpoint (``state_dict``) and a resumed run continues exactly. ``max_lag`` (the
``--max-off-policy-steps`` bound) drops groups holding tokens older than that many versions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from megatron_mtp_rl.models.routing_replay import extend_routes
from megatron_mtp_rl.models.sampling_params import GroupStop
from megatron_mtp_rl.rollout.manager import GroupFilter, RolloutBatch, RolloutManager, Sample, kept_groups


def sample_done(s: Sample) -> bool:
    """Nothing left to generate: ended with EOS or at the token limit (not stopped midway, not new)."""
    return not s.aborted


def oldest_version(group: list[Sample]) -> int | None:
    """The oldest weight version that generated a token of the group (None: no token yet)."""
    versions = [v for s in group for v in (s.versions or [])]
    return min(versions) if versions else None


def continued_routes(
    prev: torch.Tensor | None, new: torch.Tensor | None, input_len: int, new_tokens: int
) -> torch.Tensor | None:
    """A resumed sample's routes (R3): the rows recorded while its earlier tokens were generated,
    then the continuation's rows from the first position they do not cover.

    ``input_len``: the continuation's request (prompt + the tokens so far); ``new_tokens``: what it
    generated. The engine's ``new`` covers either every input position (local engine, SGLang asked
    from 0) or only those from ``prev``'s end on. ``new`` None (an aborted request answered without
    routes, e.g. never sent): ``prev`` is kept and the next continuation fills the rest.
    """
    if new is None or prev is None:
        return prev if new is None else new
    start = min(prev.shape[0], input_len - 1)  # known rows: [0, start)
    full = input_len + new_tokens - 1  # the rows of the whole sample after this continuation
    if new.shape[0] >= full:
        new = new[start:full]
    elif new.shape[0] != full - start:
        raise ValueError(f"the continuation's routes have {new.shape[0]} rows; expected {full} or {full - start}")
    return extend_routes(prev, new, start)


@dataclass
class PartialRollout:
    """The ``--rollout-function`` of partial rollouts: call it like ``RolloutManager.rollout``, plus versions."""

    over_sampling: int  # groups in flight per step on this rank
    max_lag: int | None = None  # drop groups with tokens more than this many versions old
    mask_offpolicy: bool = False  # --mask-offpolicy-in-partial-rollout
    groups: list[list[Sample]] = field(default_factory=list)  # the buffer: in flight, oldest first

    def state_dict(self) -> dict:
        return {"groups": self.groups}

    def load_state_dict(self, state: dict | None) -> None:
        self.groups = list(state["groups"]) if state else []

    def __call__(
        self,
        manager: RolloutManager,
        fetch,
        *,
        num_prompts: int,
        seed: int,
        group_filter: GroupFilter | None = None,
        max_rounds: int = 4,
        version: int = 0,
        train_version: int | None = None,
    ) -> RolloutBatch:
        """``num_prompts`` complete groups. ``version``: the weights the engine holds now; ``train_version``:
        those the batch will be trained from (default ``version``), the reference of lag and masking."""
        t0 = time.perf_counter()
        train_version = version if train_version is None else train_version
        errors_before = manager.scorer.stats.errors
        pool, self.groups = self.groups, []
        c = {"consumed": 0, "stale": 0, "wasted": 0, "generated": 0, "filtered": 0, "held": 0}
        resumed = sum(1 for g in pool for s in g if s.aborted and s.response_ids)
        kept: list[list[Sample]] = []
        dropped: list[list[Sample]] = []
        stats: dict = {}
        pool = self._harvest(manager, pool, kept, dropped, group_filter, train_version, c)
        rounds = 0
        while len(kept) < num_prompts and rounds < (max_rounds if group_filter is not None else 1):
            need = num_prompts - len(kept)
            want = self._in_flight(need, num_prompts) - len(pool)
            if want > 0:
                prompts = fetch(want)
                c["consumed"] += len(prompts)
                for p in prompts:
                    ids = manager.encode_prompt(p)
                    pool.append(
                        [Sample(p, ids, [], [], "", False, versions=[], aborted=True) for _ in range(manager.n)]
                    )
            stats = self._generate(manager, pool, need, seed * 1000 + rounds, version, train_version, c)
            pool = self._harvest(manager, pool, kept, dropped, group_filter, train_version, c)
            rounds += 1
        shortfall = max(0, num_prompts - len(kept))
        batch = kept[:num_prompts] + dropped[:shortfall]
        c["wasted"] += sum(len(s.response_ids) for g in dropped[shortfall:] for s in g)
        # complete groups beyond this step's need train at the next one, before anything newer
        self.groups = kept[num_prompts:] + pool
        return self._batch(manager, batch, train_version, resumed, shortfall, stats, c, errors_before, t0)

    def _generate(
        self, manager: RolloutManager, pool, need: int, seed: int, version: int, train_version: int, c: dict
    ) -> dict:
        """Continue every unfinished sample of ``pool`` until ``need`` more groups are done, among them the
        groups that would be too old to train if carried once more (their tokens would all be wasted)."""
        live = [(g, s) for g, grp in enumerate(pool) for s in grp if not sample_done(s)]
        if not live:
            return {}
        cap = manager.sampling.max_new_tokens
        numbering = {g: k for k, g in enumerate(dict.fromkeys(g for g, _ in live))}
        stop = GroupStop(
            groups=tuple(numbering[g] for g, _ in live),
            count=need,
            limits=tuple(cap - len(s.response_ids) for _, s in live),
            # the oldest first, no more than the step can train (a group beyond those would go stale anyway)
            required=tuple(k for g, k in numbering.items() if self._last_chance(pool[g], train_version))[:need],
        )
        c["held"] += len(stop.required)
        requests = [s.prompt_ids + s.response_ids for _, s in live]
        completions, stats = manager.engine.generate(requests, manager.sampling, seed=seed, stop=stop)
        for (_, s), req, comp in zip(live, requests, completions):
            s.routes = continued_routes(s.routes, comp.routes, len(req), len(comp.response_ids))
            s.response_ids = s.response_ids + list(comp.response_ids)
            s.logprobs = s.logprobs + list(comp.logprobs)
            s.versions = (s.versions or []) + [version] * len(comp.response_ids)
            s.finished = comp.finished
            s.aborted = bool(comp.meta.get("aborted")) and len(s.response_ids) < cap
            c["generated"] += len(comp.response_ids)
            ids = s.response_ids
            s.response_text = manager.tokenizer.decode(ids[:-1] if s.finished and ids else ids)
        return stats

    def _in_flight(self, need: int, num_prompts: int) -> int:
        """How many groups to generate for ``need`` complete ones: ``over_sampling``; under a lag bound, ``need``
        plus the over-sampling margin, so that no more groups are carried than the next step can train (a
        step short of few groups would otherwise start many, carry them all, and drop those it cannot fit)."""
        if self.max_lag is None:
            return max(self.over_sampling, need)
        return need + max(self.over_sampling - num_prompts, 0)

    def _too_old(self, group: list[Sample], train_version: int) -> bool:
        """Whether ``group`` holds a token more than ``max_lag`` versions older than ``train_version``."""
        old = oldest_version(group)
        return self.max_lag is not None and old is not None and train_version - old > self.max_lag

    def _last_chance(self, group: list[Sample], train_version: int) -> bool:
        """Whether ``group`` would be dropped as stale by the next batch (trained one version later)."""
        return self._too_old(group, train_version + 1)

    def _harvest(self, manager, pool, kept, dropped, group_filter, train_version: int, c: dict):
        """Move complete groups from ``pool`` to ``kept``/``dropped`` (scored, filtered), and drop stale ones;
        returns the groups still in flight."""
        rest, complete = [], []
        for grp in pool:
            if self._too_old(grp, train_version):
                c["stale"] += len(grp)
                c["wasted"] += sum(len(s.response_ids) for s in grp)
                continue
            (complete if all(sample_done(s) for s in grp) else rest).append(grp)
        if complete:
            flat = [s for g in complete for s in g]
            rewards = manager.scorer.score([(s.prompt.text, s.response_text, s.prompt.label) for s in flat])
            for s, r in zip(flat, rewards):
                s.reward = r
            keep = [True] * len(complete)
            if group_filter is not None:
                keep = kept_groups(group_filter, rewards, manager.n)
            for grp, ok in zip(complete, keep):
                (kept if ok else dropped).append(grp)
                c["filtered"] += not ok
        return rest

    def _batch(self, manager, groups, train_version, resumed, shortfall, stats, c, errors_before, t0) -> RolloutBatch:
        out = [s for grp in groups for s in grp]
        lags: dict[int, int] = {}
        offpolicy = total = 0
        for g, grp in enumerate(groups):
            for s in grp:
                s.group = g
                vs = s.versions or []
                old = [v < train_version for v in vs]
                offpolicy += sum(old)
                total += len(vs)
                lag = train_version - min(vs) if vs else 0
                lags[lag] = lags.get(lag, 0) + 1
                if self.mask_offpolicy and any(old):
                    base = s.loss_mask if s.loss_mask is not None else [1] * len(vs)
                    s.loss_mask = [m * (not o) for m, o in zip(base, old)]
        rewards = [s.reward for s in out]
        lengths = [len(s.response_ids) for s in out]
        n_lag = max(sum(lags.values()), 1)
        metrics = {
            "rollout/reward_mean": sum(rewards) / max(len(rewards), 1),
            "rollout/response_len": sum(lengths) / max(len(lengths), 1),
            "rollout/truncated": sum(not s.finished for s in out) / max(len(out), 1),
            "rollout/generated_samples": float(len(out)),
            "rollout/filter_shortfall": float(shortfall),
            "rollout/filtered_groups": float(c["filtered"]),
            "rollout/reward_errors": float(manager.scorer.stats.errors - errors_before),
            "rollout/partial_samples": float(sum(1 for g in self.groups for s in g if s.aborted and s.response_ids)),
            "rollout/resumed_samples": float(resumed),
            "rollout/offpolicy_token_fraction": offpolicy / max(total, 1),
            "rollout/buffer_size": float(sum(len(g) for g in self.groups)),
            "rollout/policy_lag": sum(k * v for k, v in lags.items()) / n_lag,
            "rollout/policy_lag_max": float(max(lags, default=0)),
            "rollout/stale_dropped": float(c["stale"]),
            "rollout/last_chance_groups": float(c["held"]),
            "rollout/generated_tokens": float(c["generated"]),
            "rollout/wasted_tokens": float(c["wasted"]),
            "perf/rollout_time": time.perf_counter() - t0,
        }
        for k, v in sorted(lags.items()):
            metrics[f"rollout/lag_samples_{k}"] = float(v)
        metrics.update(stats)
        return RolloutBatch(out, manager.n, metrics, c["consumed"])
