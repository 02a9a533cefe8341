"""The embedded engine: generates in-process with the training model itself.

Nothing to synchronise (it *is* the trainer's model). Requests are served in batches of
``max_batch_size`` rows; ``speculative=True`` drafts with the MTP layers (exact sampling).
``dtype="bfloat16"`` (``--rollout-dtype``) generates under bf16 autocast while the trainer
scores in its own precision: the engine/trainer precision gap of a GPU run (log-prob gap, MoE
route flips), reproducible on CPU.
"""

from __future__ import annotations

import contextlib

import torch

from megatron_mtp_rl.models.generation import GroupStop, SamplingParams, generate
from megatron_mtp_rl.rollout.engine import Completion


class LocalEngine:
    remote = False  # every rank generates (a collective forward of the training model)

    def __init__(
        self,
        model,
        *,
        vocab_size: int,
        speculative: bool = False,
        max_batch_size: int = 256,
        dtype: str | None = None,
        record_routes: bool = False,
    ):
        self.model = model
        self.vocab_size = vocab_size
        self.speculative = speculative
        self.max_batch_size = max_batch_size
        self.dtype = dtype
        self.record_routes = record_routes  # the trunk's MoE routes with each completion (R3)

    def _precision(self):
        """bf16 autocast when the engine runs in bf16 and the model's weights are not."""
        dev = next(self.model.parameters()).device
        if self.dtype != "bfloat16" or next(self.model.parameters()).dtype == torch.bfloat16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)

    def sync_weights(self) -> dict:
        """Shares the trainer's parameters: always in sync."""
        return {}

    def close(self) -> None:
        """Nothing to stop."""

    def generate(self, prompts: list[list[int]], params: SamplingParams, *, seed: int, stop: GroupStop | None = None):
        """``stop`` (partial rollouts): one batch of every request, ended between two decoding steps
        once ``stop.count`` groups are done; the rest come back with ``meta["aborted"]``."""
        # Samplers draw where the model's probabilities are (a CUDA generator on GPU).
        g = torch.Generator(device=next(self.model.parameters()).device).manual_seed(seed)
        out: list[Completion] = []
        stats = {"tokens": 0, "seconds": 0.0, "rounds": 0, "accept_len_sum": 0.0, "calls": 0}
        size = len(prompts) if stop is not None else self.max_batch_size  # a stop rule spans every group
        for s in range(0, len(prompts), size):
            chunk = prompts[s : s + size]
            with self._precision():
                res = generate(
                    self.model,
                    chunk,
                    params,
                    vocab_size=self.vocab_size,
                    generator=g,
                    speculative=self.speculative,
                    stop=stop,
                    record_routes=self.record_routes,
                )
            aborted = res.aborted or [False] * len(chunk)
            routes = res.routes or [None] * len(chunk)
            for ids, lps, fin, ab, r in zip(res.responses, res.logprobs, res.finished, aborted, routes):
                out.append(Completion(ids, lps, fin, meta={"aborted": True} if ab else {}, routes=r))
            stats["tokens"] += res.stats["tokens"]
            stats["seconds"] += res.stats["seconds"]
            stats["rounds"] += res.stats["rounds"]
            stats["accept_len_sum"] += res.stats.get("row_accept_len", 1.0)
            stats["calls"] += 1
        summary = {
            "rollout/gen_tokens_per_s": stats["tokens"] / max(stats["seconds"], 1e-9),
        }
        if self.speculative:
            summary["rollout/spec_accept_len"] = stats["accept_len_sum"] / max(stats["calls"], 1)
        return out, summary
