"""Where tensors live: the one place outside platform/cpu.py that asks CUDA anything.

A run uses one device, chosen once (:func:`megatron_mtp_rl.platform.device`). Collectives
need their tensors where the process group's backend expects them: NCCL rejects CPU
tensors and gloo CUDA ones, so every all-reduce of statistics (step denominators, OCC sums,
metrics, evaluation counts) creates its tensor with :func:`collective_device`.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def cuda_available() -> bool:
    """True when this process runs on CUDA: a device is visible (tests hide it on purpose) and
    ``MTP_RL_FORCE_CPU=1`` is not set."""
    return torch.cuda.is_available() and os.environ.get("MTP_RL_FORCE_CPU", "0") != "1"


def collective_device(group=None) -> torch.device:
    """The device a tensor must be on to be all-reduced over ``group`` (default: the world)."""
    if not dist.is_initialized():
        return torch.device("cpu")
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def generator_for(device: torch.device | str, seed: int) -> torch.Generator:
    """A seeded generator on ``device``: samplers draw on the device their probabilities are on."""
    dev = torch.device(device)
    return torch.Generator(device=dev).manual_seed(seed)


def peak_memory_gb() -> float | None:
    """Peak CUDA memory allocated by this process since start (None without CUDA)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 1e9
