"""Rollout manager: prompts → groups of n samples → rewards → group filter (dynamic sampling).

Engine-agnostic: the same manager drives the local engine, SGLang and a Ray actor. Rewards,
the group filter and the whole rollout function are plain functions, so a task plugs them in
by dotted path (``--reward-fn``, ``--dynamic-sampling-filter``, ``--rollout-function``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megatron_mtp_rl.models.generation import SamplingParams
from megatron_mtp_rl.rollout.data import Prompt
from megatron_mtp_rl.rollout.engine import RolloutEngine
from megatron_mtp_rl.rollout.tokenizer import Tokenizer


@dataclass
class Sample:
    prompt: Prompt
    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]
    response_text: str
    finished: bool
    reward: float = 0.0
    group: int = 0
    # Per response token: 1 = the policy's (trained), 0 = tool / environment output (context only,
    # its engine log-prob is a placeholder). None = every response token is the policy's.
    loss_mask: list[int] | None = None
    # The engine's MoE routes of the input tokens [prompt + response − 1, MoE layers, topk] (R3), or None.
    routes: torch.Tensor | None = None
    # Partial rollouts (rollout/partial.py): the weight version that generated each response token,
    # and whether generation was stopped before the sample's end (it continues at a later step).
    versions: list[int] | None = None
    aborted: bool = False


@dataclass
class RolloutBatch:
    samples: list[Sample]  # grouped: n consecutive samples share a prompt
    group_size: int
    metrics: dict = field(default_factory=dict)
    prompts_consumed: int = 0


# group_filter(rewards [G·n], n) -> bool mask [G·n] of the samples to keep (whole groups);
# the default is DAPO's (megatron_mtp_rl.rl.advantages:dynamic_sampling_mask).
GroupFilter = Callable[[torch.Tensor, int], torch.Tensor]


def kept_groups(group_filter: GroupFilter, rewards: list[float], n: int) -> list[bool]:
    """Per group: whether ``group_filter`` keeps it (it must keep or drop whole groups)."""
    mask = torch.as_tensor(group_filter(torch.tensor(rewards, dtype=torch.float32), n), dtype=torch.bool)
    if mask.shape != (len(rewards),):
        raise ValueError(f"group filter returned shape {tuple(mask.shape)}, expected ({len(rewards)},)")
    per_group = mask.view(-1, n)
    if not bool((per_group.all(dim=1) | ~per_group.any(dim=1)).all()):
        raise ValueError("group filter must keep or drop whole groups (n consecutive samples)")
    return per_group[:, 0].tolist()


class RolloutManager:
    def __init__(
        self,
        engine: RolloutEngine,
        tokenizer: Tokenizer,
        scorer,
        *,
        n_samples: int,
        sampling: SamplingParams,
        max_turns: int = 1,
    ):
        self.engine = engine
        self.tokenizer = tokenizer
        self.scorer = scorer  # .score([(prompt, response, label)]) -> [float]; .stats.errors
        self.n = n_samples
        self.sampling = sampling
        self.max_turns = max_turns  # --max-turns, for multi-turn rollout functions

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt.text)
        if self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        return ids

    def generate_groups(
        self, prompts: list[Prompt], seed: int, params: SamplingParams | None = None, n: int | None = None
    ):
        """``n`` (default ``--n-samples-per-prompt``) samples per prompt, with rewards; (samples, engine stats)."""
        params = params or self.sampling
        n = n or self.n
        enc = [self.encode_prompt(p) for p in prompts]
        requests = [ids for ids in enc for _ in range(n)]
        completions, stats = self.engine.generate(requests, params, seed=seed)
        samples = []
        for j, c in enumerate(completions):
            g = j // n
            ids = c.response_ids
            text_ids = ids[:-1] if c.finished and ids else ids
            text = self.tokenizer.decode(text_ids)
            samples.append(
                Sample(
                    prompts[g],
                    enc[g],
                    ids,
                    c.logprobs,
                    text,
                    c.finished,
                    group=g,
                    loss_mask=c.loss_mask,
                    routes=c.routes,
                )
            )
        rewards = self.scorer.score([(s.prompt.text, s.response_text, s.prompt.label) for s in samples])
        for s, r in zip(samples, rewards):
            s.reward = r
        return samples, stats

    def rollout(
        self,
        fetch,
        *,
        num_prompts: int,
        seed: int,
        group_filter: GroupFilter | None = None,
        max_rounds: int = 4,
    ) -> RolloutBatch:
        """Generate ``num_prompts`` groups. ``fetch(count)`` returns the next prompts.

        With a ``group_filter`` (dynamic sampling; DAPO's drops groups whose rewards are all
        equal) rejected groups are dropped and more prompts are fetched until ``num_prompts``
        groups are kept or ``max_rounds`` rounds ran (then the batch is topped up with dropped
        groups so its size stays fixed, and ``rollout/filter_shortfall`` counts them).
        """
        t0 = time.perf_counter()
        errors_before = self.scorer.stats.errors
        kept: list[list[Sample]] = []
        dropped: list[list[Sample]] = []
        consumed = 0
        stats: dict = {}
        generated = 0
        filtered = 0
        for r in range(max_rounds if group_filter is not None else 1):
            need = num_prompts - len(kept)
            if need <= 0:
                break
            prompts = fetch(need)
            consumed += len(prompts)
            samples, stats = self.generate_groups(prompts, seed=seed * 1000 + r)
            generated += len(samples)
            groups = [samples[i : i + self.n] for i in range(0, len(samples), self.n)]
            keep = [True] * len(groups)
            if group_filter is not None:
                keep = kept_groups(group_filter, [s.reward for s in samples], self.n)
            for grp, ok in zip(groups, keep):
                (kept if ok else dropped).append(grp)
                filtered += not ok
        shortfall = max(0, num_prompts - len(kept))
        kept = kept[:num_prompts] + dropped[:shortfall]
        out = [s for grp in kept for s in grp]
        for g, grp in enumerate(kept):
            for s in grp:
                s.group = g
        rewards = [s.reward for s in out]
        lengths = [len(s.response_ids) for s in out]
        metrics = {
            "rollout/reward_mean": sum(rewards) / max(len(rewards), 1),
            "rollout/response_len": sum(lengths) / max(len(lengths), 1),
            "rollout/truncated": sum(not s.finished for s in out) / max(len(out), 1),
            "rollout/generated_samples": float(generated),
            "rollout/filter_shortfall": float(shortfall),
            "rollout/filtered_groups": float(filtered),
            "rollout/reward_errors": float(self.scorer.stats.errors - errors_before),
            "perf/rollout_time": time.perf_counter() - t0,
        }
        metrics.update(stats)
        return RolloutBatch(out, self.n, metrics, consumed)
