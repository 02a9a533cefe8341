"""One mini-batch through megatron-core's forward/backward schedule (PP-aware).

Loss scaling: megatron divides each micro-batch loss by the number of micro-batches (and
multiplies by CP), and DDP averages gradients over data-parallel ranks. Our loss functions
return terms already normalised by *global* (all micro-batches, all DP ranks)
denominators, so we pre-multiply by ``num_microbatches × dp / cp`` to undo both: the
gradient is then exactly the gradient of the globally normalised loss.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_mtp_rl.models import megatron_compat as compat
from megatron_mtp_rl.models.batch import TokenBatch
from megatron_mtp_rl.models.mtp_forward import HeadLogProbs, forward_logprobs, unwrap
from megatron_mtp_rl.platform.distributed import device as platform_device

# loss_fn(batch, head_logprobs) -> (loss tensor, {name: float tensor}) on the last stage.
LossFn = Callable[[TokenBatch, HeadLogProbs], tuple[torch.Tensor, dict]]


def configure(model: torch.nn.Module) -> None:
    """Install megatron's grad finalisation (DP all-reduce) and no-sync on the model config.

    Nothing else runs inside the schedule: the OCC reduce is called by the update phase
    (``train/step.py:train_step``) right before ``optimizer.step()``.
    """
    config = model.config
    config.finalize_model_grads_func = finalize_model_grads
    if hasattr(model, "no_sync"):
        config.no_sync_func = model.no_sync


def forward_backward(
    model: torch.nn.Module,
    micro_batches: list[TokenBatch],
    loss_fn: LossFn | None,
    *,
    forward_only: bool = False,
    forward_fn: Callable | None = None,
    **forward_kwargs,
) -> list:
    """Run the schedule; returns per-micro-batch metrics dicts (last stage) or outputs.

    With ``loss_fn=None`` and ``forward_only=True`` the last stage returns the
    :class:`HeadLogProbs` of each micro-batch (the old-log-prob pass). ``forward_fn(model, batch,
    **forward_kwargs)`` replaces the policy's log-prob forward (the critic's values forward).
    """
    forward_fn = forward_fn or forward_logprobs
    if not micro_batches:
        raise ValueError("forward_backward needs at least one micro-batch")
    n = len(micro_batches)
    seq, mbs = micro_batches[0].shape[1], micro_batches[0].shape[0]
    if getattr(unwrap(model), "thd_packing", False):  # THD: one [B*S] row goes from stage to stage
        seq, mbs = seq * mbs, 1
    if len({b.shape for b in micro_batches}) > 1:  # token-budget micro-batches: stages exchange shapes
        unwrap(model).config.variable_seq_lengths = True
    scale = n * parallel_state.get_data_parallel_world_size() / max(1, parallel_state.get_context_parallel_world_size())

    def _loss(batch, received, out):
        loss, metrics = loss_fn(batch, out)
        if received is not None and received.requires_grad:
            # A loss that never reaches the trunk (heal's head-only objective) leaves this stage's
            # input gradient None: megatron's 1F1B then sends nothing back while the previous stage
            # waits for it. A zero term gives it an (all-zero) gradient to send.
            loss = loss + 0.0 * received.sum()
        return loss * scale, metrics

    def _collect(out, non_loss_data=False):
        return out

    device = platform_device()

    def step(data_iterator, m):
        # The one place batches (built on the CPU) move to the model's device.
        raw = next(data_iterator)
        batch = raw.to(device)
        replay = getattr(unwrap(m), "route_replay", None)  # MoE routing replay (models/routing_replay.py)
        if replay is not None:
            replay.before_forward(raw)
        out = forward_fn(m, batch, **forward_kwargs)
        if replay is not None:
            replay.after_forward(raw)
        if loss_fn is None:
            return out, _collect
        return out, partial(_loss, batch, compat.stage_input(unwrap(m)))

    fb = get_forward_backward_func()
    return fb(
        forward_step_func=step,
        data_iterator=iter(micro_batches),
        model=[model],
        num_microbatches=n,
        seq_length=seq,
        micro_batch_size=mbs,
        forward_only=forward_only,
        collect_non_loss_data=loss_fn is None,
    )
