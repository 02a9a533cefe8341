"""megatron-core DDP + optimizer, and gradient clipping with MTP parameters as their own group.

Why our own clip: a single global grad-norm clip over all parameters lets MTP gradients
rescale the main model's update (so ``detach`` would no longer leave the main model as
``none`` leaves it). We therefore keep megatron's clip off (``clip_grad=0``; its fp32 clip
also asserts CUDA tensors) and clip the main and MTP groups separately, computing each norm
with megatron's ``get_grad_norm_fp32`` (model-parallel reduction included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer.clip_grads import get_grad_norm_fp32
from megatron.core.transformer.module import param_is_not_shared

from megatron_mtp_rl.models.provider import is_mtp_parameter

# megatron-core's name for the parameter attribute and group that get their own grad norm.
MTP_GRAD_NORM_GROUP = "mtp"


def wrap_ddp(model: torch.nn.Module, *, use_distributed_optimizer: bool = False) -> DistributedDataParallel:
    """Wrap a GPTModel in megatron-core's DDP (fp32 grad buffers, no overlap).

    MTP parameters are tagged with megatron's ``grad_norm_group = "mtp"`` first, so the
    optimizer's (sharded) main parameters carry the tag too: that is how the clip finds the
    MTP group when the distributed optimizer holds only a shard of each gradient.
    """
    for name, p in model.named_parameters():
        if is_mtp_parameter(name):
            p.grad_norm_group = MTP_GRAD_NORM_GROUP
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=use_distributed_optimizer
    )
    return DistributedDataParallel(model.config, ddp_config, model)


def build_optimizer(
    model: DistributedDataParallel,
    *,
    lr: float,
    weight_decay: float = 0.0,
    adam_beta1: float = 0.9,
    adam_beta2: float = 0.999,
    adam_eps: float = 1e-8,
):
    """megatron-core Adam (distributed = ZeRO-1 when DDP was built with it); we clip ourselves."""
    cfg = OptimizerConfig(
        optimizer="adam",
        lr=lr,
        min_lr=0.0,
        weight_decay=weight_decay,
        adam_beta1=adam_beta1,
        adam_beta2=adam_beta2,
        adam_eps=adam_eps,
        clip_grad=0.0,
        bf16=model.config.bf16,
        fp16=model.config.fp16,
        params_dtype=model.config.params_dtype,
        use_distributed_optimizer=model.ddp_config.use_distributed_optimizer,
    )
    return get_megatron_optimizer(cfg, [model])


def _grad(p: torch.nn.Parameter) -> torch.Tensor | None:
    g = getattr(p, "main_grad", None)
    return g if g is not None else p.grad


@dataclass
class GradNorms:
    main: float
    mtp: float

    @property
    def total(self) -> float:
        return math.sqrt(self.main**2 + self.mtp**2)


def _group_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of one group's grads, every model-parallel shard counted once.

    Dense parameters reduce over the model-parallel group, experts over the expert
    tensor×model×pipeline group, as megatron's optimizers do; collective on all ranks.
    """
    dense, expert = [], []
    for p in params:
        g = _grad(p)
        if g is None or not param_is_not_shared(p):
            continue
        if not tensor_parallel.param_is_not_tensor_parallel_duplicate(p):
            continue
        (dense if getattr(p, "allreduce", True) else expert).append(g.float())
    d = get_grad_norm_fp32(dense, grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    e = get_grad_norm_fp32(
        expert,
        grad_stats_parallel_group=parallel_state.get_expert_tensor_model_pipeline_parallel_group(),
    )
    return math.sqrt(float(d) ** 2 + float(e) ** 2)


def split_parameters(model: torch.nn.Module):
    """(main parameters, MTP parameters) by name."""
    main, mtp = [], []
    for name, p in model.named_parameters():
        (mtp if is_mtp_parameter(name) else main).append(p)
    return main, mtp


def clip_grads(model: torch.nn.Module, max_norm_main: float, max_norm_mtp: float) -> GradNorms:
    """Clip main and MTP gradients separately; returns the norms before clipping.

    A max norm of 0 disables clipping for that group. Norms are identical on every rank.
    """
    main, mtp = split_parameters(model)
    norms = GradNorms(main=_group_norm(main), mtp=_group_norm(mtp))
    for params, norm, limit in ((main, norms.main, max_norm_main), (mtp, norms.mtp, max_norm_mtp)):
        if limit > 0 and math.isfinite(norm) and norm > limit:
            coeff = limit / (norm + 1e-6)
            for p in params:
                g = _grad(p)
                if g is not None:
                    g.mul_(coeff)
    return norms


def _sharded_group_norm(optimizer, group: str | None) -> float:
    """One group's grad norm from the optimizer's own (possibly sharded) main-parameter grads.

    Each chained optimizer reduces over its grad-stats group (the whole world for the
    distributed optimizer, so every shard is counted once); collective on all ranks.
    """
    total = 0.0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        grads = opt.get_grads_for_grad_norm(group)
        total += float(get_grad_norm_fp32(grads, grad_stats_parallel_group=opt.get_grad_stats_parallel_group())) ** 2
    return math.sqrt(total)


def _sharded_params(optimizer, group: str | None) -> list[torch.nn.Parameter]:
    out = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        out += [p for p in opt.get_parameters() if getattr(p, "grad_norm_group", None) == group]
    return out


def clip_sharded_and_step(optimizer, max_norm_main: float, max_norm_mtp: float) -> tuple[bool, GradNorms]:
    """The optimizer step for the distributed optimizer, with main and MTP clipped apart.

    After megatron's reduce-scatter each rank holds only its shard of every gradient, so the
    norms must come from the optimizer's shard (``prepare_grads`` puts the reduced gradients
    on its main parameters) rather than from the model's buffers. Megatron's own clip would
    use one threshold for both groups and asserts CUDA tensors; the scaling here is the same
    ``g *= max/(norm + 1e-6)`` as :func:`clip_grads`. Returns (stepped, norms before clipping).
    """
    found_inf = optimizer.prepare_grads()
    main, mtp = (_sharded_group_norm(optimizer, g) for g in (None, MTP_GRAD_NORM_GROUP))
    norms = GradNorms(main=main, mtp=mtp)
    if found_inf or not (math.isfinite(norms.main) and math.isfinite(norms.mtp)):
        return False, norms
    for group, norm, limit in ((None, norms.main, max_norm_main), (MTP_GRAD_NORM_GROUP, norms.mtp, max_norm_mtp)):
        if limit > 0 and norm > limit:
            coeff = limit / (norm + 1e-6)
            for p in _sharded_params(optimizer, group):
                if p.grad is not None:
                    p.grad.mul_(coeff)
    return optimizer.step_with_ready_grads(), norms


def clip_and_step(model, optimizer, max_norm_main: float, max_norm_mtp: float) -> tuple[bool, GradNorms]:
    """Clip main and MTP gradients apart, then ``optimizer.step()``; (stepped, norms before clipping).

    A non-finite norm skips the step on every rank (the norms are collective, so all agree).
    With the distributed optimizer the norms come from its gradient shards
    (:func:`clip_sharded_and_step`); otherwise from the model's full gradient buffers.
    """
    if model.ddp_config.use_distributed_optimizer:
        return clip_sharded_and_step(optimizer, max_norm_main, max_norm_mtp)
    norms = clip_grads(model, max_norm_main, max_norm_mtp)
    if not (math.isfinite(norms.main) and math.isfinite(norms.mtp)):
        return False, norms
    ok, _, _ = optimizer.step()
    return bool(ok), norms


def param_norm(params: list[torch.nn.Parameter]) -> float:
    """L2 norm of parameters, each model-parallel shard counted once (collective)."""
    dense, expert = [], []
    for p in params:
        if not param_is_not_shared(p) or not tensor_parallel.param_is_not_tensor_parallel_duplicate(p):
            continue
        (dense if getattr(p, "allreduce", True) else expert).append(p.detach().float())
    d = get_grad_norm_fp32(dense, grad_stats_parallel_group=parallel_state.get_model_parallel_group())
    e = get_grad_norm_fp32(
        expert,
        grad_stats_parallel_group=parallel_state.get_expert_tensor_model_pipeline_parallel_group(),
    )
    return math.sqrt(float(d) ** 2 + float(e) ** 2)
