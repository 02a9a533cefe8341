"""Start torch.distributed and megatron-core's model-parallel state in one call."""

from __future__ import annotations

import contextlib
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
    timeout_s: float | None = None,
    timeout_minutes: float = 10.0,
) -> None:
    """Initialise torch.distributed (NCCL on CUDA, gloo on CPU), parallel_state and the RNGs.

    Reads the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
    A single process without them gets an in-memory store (no socket at all). Collectives
    give up after ``timeout_minutes`` (``--distributed-timeout-minutes``; ``timeout_s`` wins
    when given), so a hung peer ends the run instead of holding it silently.
    """
    sizes = sizes or ParallelSizes()
    cuda = use_cuda()
    if not cuda:
        apply_cpu_shims()
    timeout = datetime.timedelta(seconds=timeout_s if timeout_s is not None else timeout_minutes * 60.0)
    if not dist.is_initialized():
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(
            backend="nccl" if cuda else "gloo",
            store=_rendezvous_store(rank, world, timeout),
            rank=rank,
            world_size=world,
            timeout=timeout,
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
        destroy_model_parallel_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=sizes.tensor_model_parallel_size,
        pipeline_model_parallel_size=sizes.pipeline_model_parallel_size,
        context_parallel_size=sizes.context_parallel_size,
        expert_model_parallel_size=sizes.expert_model_parallel_size,
        # megatron's own groups (DP, TP, ...) carry their own timeout (30 min by default)
        distributed_timeout_minutes=timeout.total_seconds() / 60.0,
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


def destroy_model_parallel_groups() -> None:
    """megatron-core's ``destroy_model_parallel``, and its groups destroyed too (safe to call twice).

    megatron-core 0.19 forgets its groups without destroying them (all but the DP gloo ones):
    they stay registered in torch.distributed, each gloo group keeps its worker threads, and a
    re-initialisation in the same process (in-process runs, the tests) adds a full new set.
    ``_global_process_group_list`` lists every group it made (private API: checked on 0.19.2).
    """
    made = [g for g in (getattr(parallel_state, "_global_process_group_list", None) or []) if g is not None]
    parallel_state.destroy_model_parallel()
    for group in reversed(made):  # newest first, the order torch shuts groups down in; the same on every rank
        _destroy_group(group)


def destroy_all_groups() -> None:
    """Destroy every process group of this process: megatron-core's, ours (weight-sync update groups), the default one.

    The teardown after an in-process run (the CLI, the tools, Ray's trainer actors, the test
    fixtures): nothing stays registered (a group name can be made again) and no gloo worker
    threads are left idle. Safe to call twice and without torch.distributed initialised.
    """
    from torch.distributed.distributed_c10d import _world

    if not (_world.pg_map or dist.is_initialized() or parallel_state.model_parallel_is_initialized()):
        return
    destroy_model_parallel_groups()
    # groups made outside the default group (join_update_group) or beside megatron's
    world = dist.group.WORLD if dist.is_initialized() else None
    for group in reversed(list(_world.pg_map)):
        if group is not world:
            _destroy_group(group)
    if dist.is_initialized():
        dist.destroy_process_group()
    _clear_megatron_caches()  # a group's threads end with its last reference (the collector frees cycles)


def _clear_megatron_caches() -> None:
    """Empty megatron-core's ``lru_cache``s: some key on a module and its group (``RotaryEmbedding.forward``
    keeps ``self`` and ``cp_group``), keeping both, and the group's threads, alive after the run."""
    import sys

    for name, module in list(sys.modules.items()):
        if not name.startswith("megatron.core") or module is None:
            continue
        for value in list(vars(module).values()):
            for fn in [value, *vars(value).values()] if isinstance(value, type) else [value]:
                clear = getattr(fn, "cache_clear", None)
                if callable(clear) and getattr(fn, "__module__", None) == name:
                    clear()
    replay = sys.modules.get("megatron.core.transformer.moe.router_replay")
    if replay is not None:  # every router built with --moe-enable-routing-replay registers itself for good
        replay.RouterReplay.clear_global_router_replay_instances()


def destroy() -> None:
    """Tear down parallel_state and every process group (safe to call twice): :func:`destroy_all_groups`."""
    destroy_all_groups()


def _destroy_group(group) -> None:
    from torch.distributed.distributed_c10d import _world

    if group in _world.pg_map:
        with contextlib.suppress(ValueError, RuntimeError):  # already shut down with its default group
            dist.destroy_process_group(group)


def _rendezvous_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """The store the default group meets in; never a socket listening on every interface.

    * one process, no MASTER_ADDR: an in-memory ``HashStore`` (nothing listens);
    * torchrun: torchrun's agent store (it owns that socket; ``--master-addr`` chooses it);
    * MASTER_ADDR/MASTER_PORT set by hand (Slurm, tests): rank 0 serves the store on a
      socket bound to MASTER_ADDR only (torch's own server would bind ``*:port``).
    """
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr is None or port is None:
        if world == 1:
            return dist.HashStore()
        raise RuntimeError("WORLD_SIZE > 1 needs MASTER_ADDR and MASTER_PORT (launch with torchrun)")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return dist.TCPStore(addr, int(port), world, False, timeout, use_libuv=True)
    if rank == 0:
        return bound_tcp_store(addr, int(port), world, timeout)
    return dist.TCPStore(addr, int(port), world, False, timeout, use_libuv=True)


def bound_tcp_store(host: str, port: int, world: int, timeout: datetime.timedelta) -> dist.TCPStore:
    """A TCPStore server listening on ``host:port`` only (``port`` 0: any free one; read ``store.port``).

    torch binds its store server to every interface; handing it an already bound socket
    (``master_listen_fd``, libuv backend) keeps it on the configured host.
    """
    import socket

    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(sockaddr)
        s.listen(1024)
        bound = s.getsockname()[1]
    except BaseException:
        s.close()
        raise
    # The store owns the descriptor from here on (it closes it when destroyed).
    return dist.TCPStore(host, bound, world, True, timeout, wait_for_workers=False, master_listen_fd=s.detach())


def in_process_checkpoint_writes() -> None:
    """Make megatron-core's synchronous checkpoint writer collect results in-process.

    megatron-core 0.19.2 (``dist_checkpointing/strategies/filesystem_async.py``) keeps the
    write results in a ``multiprocessing.Manager().Queue()``: a spawned helper process that
    is never shut down and outlives a killed trainer. A synchronous save writes from threads
    of this process, so a plain thread-safe ``queue.Queue`` (same ``put``/``get_nowait``)
    serves it with no process at all. Private API: checked on 0.19.2.
    """
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()


def describe_timeout(exc: BaseException) -> str | None:
    """One line naming the collective, its group's ranks and this rank when ``exc`` is a collective timeout.

    torch/gloo say only "Timed out waiting Nms for recv"; the collective and its group are
    recovered from the traceback: the innermost public ``torch.distributed`` call, or, when
    the wait happened where a coalescing block closed (megatron-core's gradient sync issues
    its all-reduces inside ``torch.distributed._coalescing_manager``), the coalesced block
    and the function that opened it. None when ``exc`` is not a timeout.
    """
    text = str(exc)
    if "Timed out" not in text and "timed out" not in text and "Timeout" not in type(exc).__name__:
        return None
    collective, group, caller = None, None, None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        path = code.co_filename.replace("\\", "/")
        if "torch/distributed" in path:
            name = code.co_name
            if name == "_coalescing_manager":
                name = f"coalesced collectives opened by {caller}" if caller else "coalesced collectives"
            if not name.startswith("_") and name != "wrapper":
                collective = name
                group = tb.tb_frame.f_locals.get("group", group)
        elif "contextlib" not in path:
            caller = code.co_name
        tb = tb.tb_next
    me = dist.get_rank() if dist.is_initialized() else 0
    try:
        ranks = dist.get_process_group_ranks(group or dist.group.WORLD) if dist.is_initialized() else []
    except Exception:
        ranks = []
    others = [r for r in ranks if r != me]
    where = f"in {collective}" if collective else "in a collective"
    peers = f" with ranks {others} (group {ranks})" if ranks else ""
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return (
        f"rank {me} timed out {where}{peers}: one of them is hung, stopped or dead "
        f"(--distributed-timeout-minutes; torch said: {first})"
    )
