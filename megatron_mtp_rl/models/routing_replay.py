"""MoE routing replay through megatron-core's ``RouterReplay`` (R3: the engine's experts, R2: the old pass's).

A model built with ``moe_enable_routing_replay`` (``RuntimeOptions.routing_replay``) has one
megatron ``RouterReplay`` per MoE router: RECORD keeps the top-k the router chose, REPLAY_FORWARD
makes it use given top-k indices (the probabilities are the router's own scores gathered at
them, so the router still gets gradients). This module only drives those instances:

- :class:`RouteRecorder` records the trunk routes while the engine generates (``generation.py``);
- :class:`RouteReplay` (``model.route_replay``) sets each micro-batch's targets before its
  forward (``train/schedule.py``) and reads back what the routers chose after it.

Routes are ``[tokens, trunk MoE layers, topk]``: one row per *input* token of a sample (prompt +
response − 1: the last response token is never fed back while generating, and its route only
changes the output at its own position, which has no label). Samples carry them as uint8
(≤ 255 experts) or int16; packed micro-batches as int16 ``[B, S, L, K]`` with −1 where no route
is known (padding, each sample's last token), filled with experts 0..K−1 for the replay.

Only the trunk's routers replay: the MTP layers have no rollout counterpart and route live.
The per-token layout follows the decoder's: ``[S, B]`` flattened (sbhd), ``[B·S]`` (THD), and
with sequence parallelism each tensor-parallel rank's slice of the sequence.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.transformer.moe.router_replay import RouterReplay, RouterReplayAction

MISSING = -1


def route_dtype(num_experts: int) -> torch.dtype:
    """The compact dtype of a sample's routes."""
    return torch.uint8 if num_experts <= 255 else torch.int16


def extend_routes(prev: torch.Tensor | None, new: torch.Tensor, start: int) -> torch.Tensor:
    """A multi-turn sample's routes: ``prev`` covers its input positions ``[0, start)``, ``new`` the
    rest (SGLang asked with ``routed_experts_start_len=start``; a local engine's full routes are cut)."""
    if prev is None or start == 0:
        return new
    if prev.shape[0] < start:
        raise ValueError(f"the earlier turns' routes cover {prev.shape[0]} positions, the append starts at {start}")
    return torch.cat([prev[:start], new.to(prev.dtype)])


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def moe_layer_indices(config) -> dict[int, int]:
    """Global 1-based decoder layer number → index among the trunk's MoE layers."""
    freq = getattr(config, "moe_layer_freq", 1)
    n = config.num_layers
    pattern = list(freq) if isinstance(freq, list) else [1 if i % freq == 0 else 0 for i in range(n)]
    out, k = {}, 0
    for i, is_moe in enumerate(pattern):
        if is_moe:
            out[i + 1] = k
            k += 1
    return out


def trunk_routers(model: torch.nn.Module) -> list[tuple[int, RouterReplay]]:
    """``(MoE-layer index, RouterReplay)`` of this stage's decoder layers, in layer order."""
    gpt = _unwrap(model)
    index = moe_layer_indices(gpt.config)
    out = []
    for layer in gpt.decoder.layers:
        router = getattr(getattr(layer, "mlp", None), "router", None)
        rr = getattr(router, "router_replay", None)
        if rr is not None:
            out.append((index[layer.layer_number], rr))
    return out


def mtp_routers(model: torch.nn.Module) -> list[RouterReplay]:
    """The MTP layers' RouterReplay instances (always live)."""
    gpt = _unwrap(model)
    mtp = getattr(gpt, "mtp", None)
    if mtp is None:
        return []
    return [
        m.router_replay for m in mtp.modules() if getattr(m, "router_replay", None) is not None and hasattr(m, "topk")
    ]


def num_moe_layers(model: torch.nn.Module) -> int:
    return len(moe_layer_indices(_unwrap(model).config))


def _set(rrs, action: RouterReplayAction | None) -> None:
    for rr in rrs:
        rr.clear_indices()
        if action is None:
            rr.clear_router_replay_action()
        else:
            rr.set_router_replay_action(action)


class RouteRecorder:
    """Records the trunk's routes of each forward of a KV-cached generation, by cache slot.

    ``capture(start, end)`` after the trunk ran over slots ``[start, end)`` of ``B`` rows.
    """

    def __init__(self, model: torch.nn.Module, batch: int, slots: int):
        self.routers = trunk_routers(model)
        self.mtp = mtp_routers(model)
        cfg = _unwrap(model).config
        self.topk = cfg.moe_router_topk
        self.layers = num_moe_layers(model)
        self.routes = torch.full((batch, slots, self.layers, self.topk), MISSING, dtype=torch.int16)

    def __enter__(self) -> RouteRecorder:
        _set([rr for _, rr in self.routers], RouterReplayAction.RECORD)
        _set(self.mtp, None)
        return self

    def __exit__(self, *exc) -> None:
        _set([rr for _, rr in self.routers], None)

    def capture(self, start: int, end: int) -> None:
        b = self.routes.shape[0]
        for idx, rr in self.routers:
            top = rr.get_recorded_indices()  # [(end-start)·B, K], sequence-major
            self.routes[:, start:end, idx] = top.reshape(end - start, b, -1).transpose(0, 1).to(torch.int16).cpu()


def token_layout(routes: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """``[B, S, L, K]`` → ``[tokens on this rank, L, K]`` in the order the decoder's routers see them."""
    gpt = _unwrap(model)
    if getattr(gpt, "thd_packing", False):
        flat = routes.reshape(-1, 1, *routes.shape[2:])  # one [B·S] row: [T, 1, L, K]
    else:
        flat = routes.transpose(0, 1)  # [S, B, L, K]
    if gpt.config.sequence_parallel:
        tp, r = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        n = flat.shape[0] // tp
        flat = flat[r * n : (r + 1) * n]
    return flat.reshape(-1, *routes.shape[2:])


def batch_layout(flat: torch.Tensor, shape: tuple[int, int], model: torch.nn.Module) -> torch.Tensor:
    """Inverse of :func:`token_layout` for this rank's tokens: ``[T, K]`` → ``[B, S, K]`` (−1 elsewhere)."""
    gpt = _unwrap(model)
    b, s = shape
    k = flat.shape[-1]
    if getattr(gpt, "thd_packing", False):
        full = torch.full((b * s, k), MISSING, dtype=flat.dtype, device=flat.device)
        view = lambda t: t.reshape(b, s, k)  # noqa: E731
    else:
        full = torch.full((s * b, k), MISSING, dtype=flat.dtype, device=flat.device)
        view = lambda t: t.reshape(s, b, k).transpose(0, 1)  # noqa: E731
    if gpt.config.sequence_parallel:
        tp, r = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()
        n = full.shape[0] // tp
        full[r * n : (r + 1) * n] = flat
    else:
        full[:] = flat
    return view(full)


def _filled(target: torch.Tensor, topk: int) -> torch.Tensor:
    """Missing routes (−1) → experts 0..K−1 (tokens whose route changes no loss term)."""
    fill = torch.arange(topk, device=target.device, dtype=target.dtype).expand_as(target)
    missing = (target < 0).any(-1, keepdim=True)
    return torch.where(missing, fill, target).long()


class RouteReplay:
    """One model's replay state, consulted around each micro-batch forward (``train/schedule.py``).

    ``source``: the batch attribute whose routes the trunk replays (None: route live);
    ``record_to``: a batch attribute that receives the routes the trunk chose (R2's old pass);
    ``observe``: count where the trunk's own top-k set equals ``batch.routes`` (agreement).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.routers = trunk_routers(model)
        self.mtp = mtp_routers(model)
        self.topk = _unwrap(model).config.moe_router_topk
        self.source: str | None = None
        self.record_to: str | None = None
        self.observe = False
        self.agree = 0.0
        self.total = 0.0
        self._own: dict[int, torch.Tensor] = {}
        for idx, rr in self.routers:
            rr.get_replay_topk = self._observing(idx, rr.get_replay_topk)

    def _observing(self, idx: int, inner):
        """``RouterReplay.get_replay_topk`` that also keeps the router's own top-k while observing."""

        def get_replay_topk(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            if self.observe or self.record_to:
                with torch.no_grad():
                    _, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
                self._own[idx] = own
            return inner(scores, topk, num_groups, group_topk, default_compute_topk)

        return get_replay_topk

    def configure(self, *, source: str | None = None, record_to: str | None = None, observe: bool = False) -> None:
        self.source, self.record_to, self.observe = source, record_to, observe

    def before_forward(self, batch) -> None:
        """Set this micro-batch's replay targets (or live routing)."""
        self._own = {}
        _set(self.mtp, None)
        routes = getattr(batch, self.source, None) if self.source else None
        trunk = [rr for _, rr in self.routers]
        if routes is None:
            _set(trunk, None)
            return
        flat = _filled(token_layout(routes, self.model), self.topk)
        dev = next(_unwrap(self.model).parameters()).device
        _set(trunk, RouterReplayAction.REPLAY_FORWARD)
        for idx, rr in self.routers:
            rr.set_target_indices(flat[:, idx].to(dev))

    def after_forward(self, batch) -> None:
        """Agreement with the rollout's routes, R2's recorded routes; then drop the targets."""
        routes = getattr(batch, "routes", None)
        shape = tuple(batch.tokens.shape)
        if self.observe and routes is not None and self._own:
            want = token_layout(routes, self.model)
            for idx, own in self._own.items():
                w = want[:, idx].to(own.device).long()
                known = (w >= 0).all(-1)
                same = (own.sort(-1).values == w.sort(-1).values).all(-1)
                self.agree += float((same & known).sum())
                self.total += float(known.sum())
        if self.record_to and self._own:
            k = self.topk
            layers = num_moe_layers(self.model)
            rec = getattr(batch, self.record_to, None)
            if rec is None:
                rec = torch.full((*shape, layers, k), MISSING, dtype=torch.int16)
            for idx, own in self._own.items():
                rec[:, :, idx] = batch_layout(own.to(torch.int16).cpu(), shape, self.model)
            setattr(batch, self.record_to, rec)
        self._own = {}
        _set([rr for _, rr in self.routers], None)

    def take_agreement(self) -> tuple[float, float]:
        """(agreeing, counted) (token, MoE layer) pairs since the last call."""
        out = (self.agree, self.total)
        self.agree = self.total = 0.0
        return out


def install(model: torch.nn.Module) -> RouteReplay | None:
    """Attach a :class:`RouteReplay` to a model built with routing replay (None when it has none)."""
    gpt = _unwrap(model)
    if not getattr(gpt.config, "moe_enable_routing_replay", False):
        return None
    if getattr(gpt, "route_replay", None) is None:
        gpt.route_replay = RouteReplay(gpt)
    return gpt.route_replay
