"""The step's throughput metrics: tokens/s, padding, DP token imbalance, TFLOP/s per GPU and MFU.

Computed from the micro-batches the trainer actually ran (``perf/padding_fraction`` counts the
padding positions of their rows) and reduced over the data-parallel ranks in two small
all-reduces. FLOPs come from :mod:`megatron_mtp_rl.train.flops`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_mtp_rl.platform.device import collective_device
from megatron_mtp_rl.train.flops import default_peak_tflops, step_flops


def real_lengths(batch) -> list[int]:
    """Token counts of the packed sequences of a micro-batch (segment ids > 0)."""
    seg = batch.segment_ids
    out: list[int] = []
    for row in seg:
        ids, counts = torch.unique_consecutive(row, return_counts=True)
        out += [int(c) for i, c in zip(ids.tolist(), counts.tolist()) if i > 0]
    return out


def throughput_metrics(cfg, model_args, micro_batches: list, *, with_mtp: bool, train_time: float, step_time: float):
    """``perf/*`` of one step from this rank's micro-batches (one per list entry, all updates)."""
    lengths = [n for b in micro_batches for n in real_lengths(b)]
    positions = sum(b.tokens.numel() for b in micro_batches)
    flops = step_flops(
        model_args,
        lengths,
        with_mtp=with_mtp,
        recompute=cfg.parallel.recompute_granularity,
        reference=cfg.algo.kl_coef > 0,
    )
    group = parallel_state.get_data_parallel_group()
    dev = collective_device(group)
    total = torch.tensor([sum(lengths), positions, flops], dtype=torch.float64, device=dev)
    most = torch.tensor([sum(lengths)], dtype=torch.float64, device=dev)
    dp = parallel_state.get_data_parallel_world_size()
    if dist.is_initialized() and dp > 1:
        dist.all_reduce(total, group=group)
        dist.all_reduce(most, op=dist.ReduceOp.MAX, group=group)
    tokens, positions, flops = total.tolist()
    world = dist.get_world_size() if dist.is_initialized() else 1
    m = {
        "perf/tokens_per_s": tokens / max(step_time, 1e-9),
        "perf/padding_fraction": 1.0 - tokens / max(positions, 1.0),
        "perf/dp_token_imbalance": float(most.item()) / max(tokens / dp, 1.0),
        "perf/tflops_per_gpu": flops / world / max(train_time, 1e-9) / 1e12,
    }
    peak = cfg.log.peak_tflops
    if peak is None and torch.cuda.is_available():
        peak = default_peak_tflops(torch.cuda.get_device_name())
    if peak:
        m["perf/mfu"] = m["perf/tflops_per_gpu"] / peak
    return m
