"""Start torch.distributed and megatron-core's model-parallel state in one call."""

from __future__ import annotations

import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_mtp_rl.platform.cpu import apply_cpu_shims


@dataclass(frozen=True)
class ParallelSizes:
    """Model-parallel sizes, named as Megatron's flags name them."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    context_parallel_size: int = 1


def use_cuda() -> bool:
    """True when this process should run on a CUDA device (NCCL backend)."""
    return torch.cuda.is_available() and os.environ.get("MTP_RL_FORCE_CPU", "0") != "1"


def device() -> torch.device:
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def initialize(
    sizes: ParallelSizes | None = None,
    *,
    seed: int = 1234,
    timeout_s: float = 600.0,
) -> None:
    """Initialise torch.distributed (NCCL on CUDA, gloo on CPU), parallel_state and the RNGs.

    Reads the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT);
    without them it starts a single-process group on 127.0.0.1.
    """
    sizes = sizes or ParallelSizes()
    cuda = use_cuda()
    if not cuda:
        apply_cpu_shims()
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
            init_method = "env://"
        elif world == 1:
            # A private rendezvous for a single process; nothing is written to os.environ,
            # so subprocesses (tools, tests) never inherit a port that is already taken.
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        else:
            raise RuntimeError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (launch with torchrun)")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            init_method=init_method,
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    world = dist.get_world_size()
    model_parallel = sizes.tensor_model_parallel_size * sizes.pipeline_model_parallel_size * sizes.context_parallel_size
    if world % model_parallel != 0:
        raise ValueError(
            f"world size {world} is not divisible by TP×PP×CP = {model_parallel} "
            f"(--tensor-model-parallel-size {sizes.tensor_model_parallel_size}, "
            f"--pipeline-model-parallel-size {sizes.pipeline_model_parallel_size}, "
            f"--context-parallel-size {sizes.context_parallel_size})"
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        expert_model_parallel_size=sizes.expert_model_parallel_size,
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed python, numpy, torch and megatron's model-parallel RNG tracker.

    The torch CPU generator gets the same seed on every rank so that CPU weight
    initialisation (``use_cpu_initialization``) is identical across TP/DP ranks.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down parallel_state and the process group (safe to call twice)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
