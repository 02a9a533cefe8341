"""Micro-batches by tokens (``--use-dynamic-batch-size --max-tokens-per-gpu N``) and DP balance (``--balance-data``).

RL responses range from a few tokens to many thousands: a fixed number of samples per micro-batch
lets one long answer set the memory peak, and equal sample counts per data-parallel rank let the
rank with the longest answers set the step time. Here a micro-batch is one packed row of at most
``N`` real tokens (the fewest such rows we find), and each update's samples are dealt to the DP
ranks by tokens. The loss is unchanged: its denominators are global (``rl/loss.py``) and the
schedule's scale cancels the micro-batch count (``train/schedule.py``), so the same samples give
the same gradient whatever the grouping.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.errors import DataError
from megatron_mtp_rl.models.batch import pack_sequences
from megatron_mtp_rl.platform.device import collective_device
from megatron_mtp_rl.rl.loss import RLBatch
from megatron_mtp_rl.rollout.manager import Sample

# A dynamic micro-batch's row is padded to a multiple of this (sequence-parallel TP and CP split it).
ROW_MULTIPLE = 8


def sample_length(sample) -> int:
    """Tokens a sample occupies in a packed row (prompt + response)."""
    return len(sample.prompt_ids) + len(sample.response_ids)


def check_fits(lengths: Sequence[int], max_tokens: int) -> None:
    """A one-line error naming the first sample longer than the budget."""
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise DataError(
                f"sample {i} of this step has {n} tokens (prompt + response), more than --max-tokens-per-gpu "
                f"{max_tokens}: raise --max-tokens-per-gpu to at least the longest sample"
            )


def _first_fit_decreasing(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        b = next((j for j, load in enumerate(loads) if load + lengths[i] <= max_tokens), len(loads))
        if b == len(loads):
            bins.append([])
            loads.append(0)
        bins[b].append(i)
        loads[b] += lengths[i]
    return bins


def balanced_parts(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Indices split into ``parts`` groups of near-equal token sums (greedy LPT).

    Longest first, each to the least-loaded group: the largest group is at most
    ``mean + max(lengths)`` and at most 4/3 of the best possible. Indices within a group
    keep their input order; groups are returned in a fixed (deterministic) order.
    """
    heap = [(0, p) for p in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, p = heapq.heappop(heap)
        out[p].append(i)
        heapq.heappush(heap, (load + lengths[i], p))
    return [sorted(g) for g in out]


def token_bins(lengths: Sequence[int], max_tokens: int, count: int | None = None) -> list[list[int]]:
    """Indices grouped into micro-batches of at most ``max_tokens`` tokens each.

    The fewest groups we find: from ``⌈Σ/N⌉`` up to first-fit decreasing's count, the first
    count whose balanced (LPT) split fits the budget, else first-fit decreasing itself.
    ``count`` (≥ that number) asks for exactly that many groups (pipeline parallelism: every DP
    rank runs the same number): a balanced split into ``count`` if it fits, else the fewest
    groups with the largest multi-sample ones split in two, then empty ones added.
    """
    check_fits(lengths, max_tokens)

    def fits(parts: list[list[int]]) -> bool:
        return max(sum(lengths[i] for i in g) for g in parts) <= max_tokens

    if count is not None:
        parts = balanced_parts(lengths, count)
        if fits(parts):
            return [g for g in parts if g] + [[] for g in parts if not g]
    ffd = [sorted(b) for b in _first_fit_decreasing(lengths, max_tokens)] or [[]]
    bins = ffd
    for k in range(max(1, math.ceil(sum(lengths) / max_tokens)), len(ffd)):
        parts = balanced_parts(lengths, k)
        if fits(parts):
            bins = parts
            break
    if count is None:
        return bins
    if count < len(bins):
        raise ValueError(f"{count} micro-batches asked for, but these samples need {len(bins)}")
    while len(bins) < count:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        big = max(splittable, key=lambda b: sum(lengths[i] for i in b))
        bins.remove(big)
        halves = balanced_parts([lengths[i] for i in big], 2)
        bins += [[big[j] for j in h] for h in halves]
    return bins


def max_over_dp(values: list[int]) -> list[int]:
    """Element-wise maximum over the data-parallel ranks (one all-reduce)."""
    group = parallel_state.get_data_parallel_group()
    t = torch.tensor(values, dtype=torch.long, device=collective_device(group))
    if dist.is_initialized() and parallel_state.get_data_parallel_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.tolist()


def token_micro_batches(
    samples: list,
    advantages: list[float],
    max_tokens: int,
    *,
    count: int | None = None,
    keys: list[int] | None = None,
    spans: dict | None = None,
) -> list:
    """RLBatches of one packed row each, ≤ ``max_tokens`` real tokens, the row padded to ``ROW_MULTIPLE``.

    ``count``: exactly that many micro-batches (see :func:`token_bins`); an empty one is a row of
    padding, which adds nothing to any loss or count. ``keys``/``spans``: as ``build_micro_batches``.
    """

    lengths = [sample_length(s) for s in samples]
    with_lp = bool(samples) and all(len(x.logprobs) == len(x.response_ids) for x in samples)
    out = []
    for group in token_bins(lengths, max_tokens, count):
        if not group:
            out.append(_empty_micro_batch(with_lp))
            continue
        row = max(ROW_MULTIPLE, math.ceil(sum(lengths[i] for i in group) / ROW_MULTIPLE) * ROW_MULTIPLE)
        chunk = [samples[i] for i in group]
        out += build_micro_batches(
            chunk,
            [advantages[i] for i in group],
            max(1, len(chunk)),
            row,
            False,
            keys=[keys[i] for i in group] if keys is not None else None,
            spans=spans,
        )
    return out


def _empty_micro_batch(with_rollout_logprobs: bool):
    """A row of padding: it runs through the model, adds nothing to any loss, count or gradient."""
    b, _ = pack_sequences([], ROW_MULTIPLE)
    zeros = torch.zeros(b.tokens.shape, dtype=torch.float32)
    return RLBatch(**b.__dict__, advantages=zeros, rollout_logprobs=zeros.clone() if with_rollout_logprobs else None)


def same_count_micro_batches(
    minibatches: list[tuple[list, list[float], list[int]]], max_tokens: int, *, equal_counts: bool, spans=None
) -> list[list]:
    """Token micro-batches of each ``(samples, advantages, keys)`` mini-batch.

    ``equal_counts`` (pipeline parallelism): every DP rank runs the same number of micro-batches
    in each update (megatron's schedule needs it), the maximum over ranks (one all-reduce).
    """
    counts = None
    if equal_counts:
        need = [len(token_bins([sample_length(s) for s in m[0]], max_tokens)) for m in minibatches]
        counts = max_over_dp(need)
    return [
        token_micro_batches(s, a, max_tokens, count=counts[j] if counts else None, keys=k, spans=spans)
        for j, (s, a, k) in enumerate(minibatches)
    ]


def gather_over_dp(samples: list, advantages: torch.Tensor) -> tuple[list, torch.Tensor, int]:
    """Every DP rank's samples and advantages, in rank order; and where this rank's start.

    Advantages are computed on each rank before this (its groups are whole there), so the group
    statistics are those of the full group whichever rank trains a sample.
    """
    dp = parallel_state.get_data_parallel_world_size()
    if dp == 1 or not dist.is_initialized():
        return samples, advantages, 0
    box: list = [None] * dp
    dist.all_gather_object(box, (samples, advantages.tolist()), group=parallel_state.get_data_parallel_group())
    me = parallel_state.get_data_parallel_rank()
    offset = sum(len(s) for s, _ in box[:me])
    return [x for s, _ in box for x in s], torch.tensor([a for _, adv in box for a in adv]), offset


def balanced_minibatches(samples: list, order: list[int], per_update: int, dp: int, dp_rank: int) -> list[list[int]]:
    """This rank's sample indices per update: each update's ``per_update`` samples (the global
    mini-batch, taken in ``order``) dealt to ``dp`` ranks by tokens; every sample exactly once."""
    out = []
    for s in range(0, len(order), per_update):
        ids = order[s : s + per_update]
        parts = balanced_parts([sample_length(samples[i]) for i in ids], dp)
        out.append([ids[j] for j in parts[dp_rank]])
    return out


def balance_on(optim) -> bool:
    """``--balance-data``, whose default follows ``--use-dynamic-batch-size``."""
    return optim.use_dynamic_batch_size if optim.balance_data is None else optim.balance_data


def plan_minibatches(cfg, samples: list, adv: torch.Tensor, shuffle_seed: int, spans: dict | None = None) -> list:
    """This rank's updates (lists of RLBatches) with ``--balance-data`` and/or ``--use-dynamic-batch-size``.

    Balanced: the step's samples of all DP ranks, shuffled alike on every rank (``shuffle_seed``),
    cut into global mini-batches of ``--global-batch-size`` and dealt to the ranks by tokens.
    ``spans`` is keyed by this rank's own sample indices, as without balancing.
    """
    import random

    op = cfg.optim
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = op.global_batch_size // dp
    offset = 0
    if balance_on(op):
        samples, adv, offset = gather_over_dp(samples, adv)
        order = list(range(len(samples)))
        random.Random(shuffle_seed).shuffle(order)
        groups = balanced_minibatches(samples, order, per_rank * dp, dp, dp_rank)
    else:
        order = list(range(len(samples)))
        random.Random(shuffle_seed).shuffle(order)
        groups = [order[s : s + per_rank] for s in range(0, len(order), per_rank)]
    parts = [([samples[i] for i in g], [float(adv[i]) for i in g], [i - offset for i in g]) for g in groups]
    pp = cfg.parallel.pipeline_model_parallel_size > 1
    if op.use_dynamic_batch_size:
        return same_count_micro_batches(parts, op.max_tokens_per_gpu, equal_counts=pp, spans=spans)
    seq = cfg.data.seq_length
    return [build_micro_batches(s, a, op.micro_batch_size, seq, pp, keys=k, spans=spans) for s, a, k in parts]


def build_micro_batches(
    samples: list[Sample],
    advantages: list[float],
    mbs: int,
    seq_length: int,
    pad_rows: bool,
    *,
    keys: list[int] | None = None,
    spans: dict | None = None,
):
    """Pack samples (``mbs`` per micro-batch) into RLBatches with per-token advantages."""
    out = []
    for s in range(0, len(samples), mbs):
        chunk = samples[s : s + mbs]
        seqs = [(x.prompt_ids, x.response_ids) for x in chunk]
        batch, where = pack_sequences(seqs, seq_length, rows=mbs if pad_rows else None)
        adv = torch.zeros(batch.tokens.shape, dtype=torch.float32)
        # The engine's log-probs (rollout–trainer mismatch metrics, --tis-cap), when it returned them.
        has_lp = all(len(x.logprobs) == len(x.response_ids) for x in chunk)
        rollout_lp = torch.zeros(batch.tokens.shape, dtype=torch.float32) if has_lp else None
        rl_batch = RLBatch(
            **batch.__dict__,
            advantages=adv,
            rollout_logprobs=rollout_lp,
            routes=pack_routes(chunk, where, batch.tokens.shape),
        )
        for j, (x, a, (row, start, n)) in enumerate(zip(chunk, advantages[s : s + mbs], where)):
            adv[row, start + len(x.prompt_ids) - 1 : start + n - 1] = a
            if x.loss_mask is not None:  # tool / environment tokens: context only, out of every loss term
                batch.loss_mask[row, start + len(x.prompt_ids) - 1 : start + n - 1] &= response_mask(x)
            if has_lp:
                rollout_lp[row, start + len(x.prompt_ids) - 1 : start + n - 1] = torch.tensor(x.logprobs)
            if spans is not None and keys is not None:
                spans[keys[s + j]] = (rl_batch, row, start + len(x.prompt_ids) - 1, start + n - 1)
        out.append(rl_batch)
    return out


def pack_routes(chunk: list[Sample], where: list[tuple], shape) -> torch.Tensor | None:
    """The samples' engine MoE routes in the packed frame ``[B, S, L, K]`` int16 (−1: none), when every
    sample has them (R3; models/routing_replay.py)."""
    if not chunk or any(getattr(x, "routes", None) is None for x in chunk):
        return None
    r0 = chunk[0].routes
    out = torch.full((*shape, *r0.shape[1:]), -1, dtype=torch.int16)
    for x, (row, start, n) in zip(chunk, where):
        if x.routes.shape[0] != n - 1:
            raise ValueError(
                f"a sample's routes cover {x.routes.shape[0]} tokens, expected {n - 1} (prompt + response - 1)"
            )
        out[row, start : start + n - 1] = x.routes.to(torch.int16)
    return out


def response_mask(sample: Sample) -> torch.Tensor:
    """The sample's per-response-token loss mask as a bool tensor (checked against its length)."""
    if len(sample.loss_mask) != len(sample.response_ids):
        raise ValueError(
            f"a sample's loss_mask has {len(sample.loss_mask)} entries for {len(sample.response_ids)} response "
            "tokens (the rollout function must give one per response token)"
        )
    return torch.tensor(sample.loss_mask, dtype=torch.bool)
