"""Which MoE routes each pass of an RL step uses (R3, R2), and ``rollout/routing_agreement``.

- R3 (``--use-rollout-routing-replay``): the old-logprob, reference and update passes replay the
  routes the engine chose while generating (``batch.routes``).
- R2 (``--use-routing-replay``): the old-logprob pass routes live and records its routes
  (``batch.r2_routes``); the update passes of the same step replay them.
- Whenever the samples carry the engine's routes, the old-logprob pass counts the (token, MoE
  layer) pairs where the trainer's own top-k set equals the engine's (with R3: the trainer's own
  choice on the replayed pass's inputs, before the replay overrides it).

MTP layers always route live. The mechanics (megatron's ``RouterReplay``) are in
``models/routing_replay.py``; ``train/schedule.py`` calls it around each micro-batch forward.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from megatron_mtp_rl.models.mtp_forward import unwrap
from megatron_mtp_rl.platform.device import collective_device


def _replay(model):
    return getattr(unwrap(model), "route_replay", None) if model is not None else None


@contextmanager
def old_pass(ctx):
    """Configure the old-logprob (and reference) passes; the update passes after it."""
    al = ctx.cfg.algo
    r3 = "routes" if al.use_rollout_routing_replay else None
    ref = _replay(getattr(ctx.reference, "model", None))
    if ref is not None:
        ref.configure(source=r3)
    r = _replay(ctx.run.model)
    if r is None:
        yield
        return
    r.configure(source=r3, record_to="r2_routes" if al.use_routing_replay else None, observe=True)
    try:
        yield
    finally:
        r.configure(source=r3 or ("r2_routes" if al.use_routing_replay else None))


def agreement_metrics(ctx) -> dict:
    """``rollout/routing_agreement`` over every rank's counts of the old pass (absent when none)."""
    r = _replay(ctx.run.model)
    if r is None:
        return {}
    t = torch.tensor(r.take_agreement(), dtype=torch.float64, device=collective_device(None))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    agree, total = t.tolist()
    return {"rollout/routing_agreement": agree / total} if total > 0 else {}
