"""Log-probabilities, entropy and draft acceptance over a tensor-parallel vocabulary.

The logits of one TP rank hold a contiguous slice ``[rank*V/TP, (rank+1)*V/TP)`` of the
vocabulary. Softmax statistics need a max and a sum-exp over the whole vocabulary, so we
all-reduce those (one all-reduce per statistic for the whole batch, not per chunk) and never
gather full-vocabulary logits. Work runs in token chunks, so the extra memory beyond the
logits themselves is O(chunk × V/TP) in fp32, in forward and in backward.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist

# Rows per chunk are chosen so one fp32 chunk holds about this many elements (64 MiB).
CHUNK_ELEMENTS = 2**24

# MTP_RL_COMPILE_LOGPROBS=1 / 0: the log-prob pass's per-chunk kernels through torch.compile, or eager.
# Unset: compiled for CUDA tensors, eager on the CPU (where inductor's C++ compile takes tens of seconds).
COMPILE_ENV = "MTP_RL_COMPILE_LOGPROBS"
_compiled: dict = {}


def _lse_and_pick(x: torch.Tensor, local_t: torch.Tensor, in_shard: torch.Tensor):
    """One chunk's fp32 log-sum-exp per row and its target logit (0 outside this shard), in one pass."""
    xf = x.float()
    m = xf.amax(-1)
    lse = (xf - m[:, None]).exp().sum(-1).log() + m
    return lse, xf.gather(1, local_t[:, None]).squeeze(1) * in_shard


def _logprob_grad(x: torch.Tensor, lse: torch.Tensor, g: torch.Tensor, local_t: torch.Tensor, in_shard):
    """One chunk's gradient of Σ g·log p[target]: g·(onehot − p), in the logits' dtype."""
    grad = (x.float() - lse[:, None]).exp() * -g[:, None]
    grad = grad.scatter_add(1, local_t[:, None], (g * in_shard)[:, None])
    return grad.to(x.dtype)


def _use_compiled(x: torch.Tensor) -> bool:
    flag = os.environ.get(COMPILE_ENV)
    return x.is_cuda if flag is None else flag == "1"


def _kernel(fn, x: torch.Tensor):
    """``fn`` compiled (once per process) when enabled for ``x``; eager if torch.compile fails."""
    if not _use_compiled(x) or _compiled.get(fn.__name__) is False:
        return fn
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=None)
    compiled = _compiled[fn.__name__]

    def run(*args):
        try:
            return compiled(*args)
        except Exception as e:  # inductor without a compiler, an unsupported backend: stay correct
            warnings.warn(
                f"{COMPILE_ENV}: torch.compile of {fn.__name__} failed ({e}); running it eagerly", stacklevel=2
            )
            _compiled[fn.__name__] = False
            return fn(*args)

    return run


def _default_chunk(v_local: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, v_local))


def _shifted_exp(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``exp(x - shift[:, None])`` in fp32 with a single chunk-sized temporary."""
    t = x.to(torch.float32, copy=True)
    return t.sub_(shift[:, None]).exp_()


def _tp_info(tp_group) -> tuple[int, int]:
    if tp_group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)


def _all_reduce(t: torch.Tensor, op, tp_group) -> torch.Tensor:
    if tp_group is not None and dist.is_initialized() and dist.get_world_size(tp_group) > 1:
        dist.all_reduce(t, op=op, group=tp_group)
    return t


def _chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield s, min(n, s + chunk)


def _valid_columns(v_local: int, vocab_size: int | None, tp_group) -> int:
    """How many of this shard's columns are real tokens (the rest is megatron's vocab padding)."""
    if vocab_size is None:
        return v_local
    rank, _ = _tp_info(tp_group)
    return max(0, min(v_local, vocab_size - rank * v_local))


def _logsumexp(x: torch.Tensor, chunk: int, tp_group) -> torch.Tensor:
    """Global log-sum-exp per row of a [N, V/TP] shard, fp32, with two all-reduces.

    Each shard's own log-sum-exp comes from torch's fused kernel, chunk by chunk; the shards
    are then combined as log Σ_r exp(lse_r) (stable: shifted by the max over ranks). A shard
    with no real columns (only padding) contributes -inf.
    """
    n = x.shape[0]
    lse = torch.full((n,), float("-inf"), dtype=torch.float32, device=x.device)
    if x.shape[1]:
        for s, e in _chunks(n, chunk):
            lse[s:e] = torch.logsumexp(x[s:e].float(), dim=-1)
    return _combine_lse(lse, tp_group)


def _combine_lse(lse: torch.Tensor, tp_group) -> torch.Tensor:
    """log Σ_r exp(lse_r) over the TP ranks' shard log-sum-exps (two all-reduces)."""
    if tp_group is None or not dist.is_initialized() or dist.get_world_size(tp_group) == 1:
        return lse
    mx = lse.clone()
    _all_reduce(mx, dist.ReduceOp.MAX, tp_group)
    se = (lse - mx).exp_()
    _all_reduce(se, dist.ReduceOp.SUM, tp_group)
    return mx + se.log_()


def _local_targets(targets: torch.Tensor, vocab_start: int, vocab_local: int):
    local = targets - vocab_start
    in_shard = (local >= 0) & (local < vocab_local)
    return local.clamp(0, max(vocab_local - 1, 0)), in_shard


class _VocabParallelLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, tp_group, chunk, valid):
        v_local = logits.shape[-1]
        rank, _ = _tp_info(tp_group)
        x = logits.reshape(-1, v_local)[:, :valid]
        t = targets.reshape(-1)
        local_t, in_shard = _local_targets(t, rank * v_local, valid)
        if valid and _use_compiled(x):  # one fused pass per chunk: log-sum-exp and the target logit
            lse = torch.empty(t.shape[0], dtype=torch.float32, device=t.device)
            picked = torch.empty_like(lse)
            kernel = _kernel(_lse_and_pick, x)
            for s, e in _chunks(x.shape[0], chunk):
                lse[s:e], picked[s:e] = kernel(x[s:e], local_t[s:e], in_shard[s:e])
            lse = _combine_lse(lse, tp_group)
        else:
            lse = _logsumexp(x, chunk, tp_group)
        if valid and not _use_compiled(x):
            picked = x.gather(1, local_t[:, None]).squeeze(1).float() * in_shard
        elif not valid:
            picked = torch.zeros(t.shape[0], dtype=torch.float32, device=t.device)
        _all_reduce(picked, dist.ReduceOp.SUM, tp_group)
        ctx.save_for_backward(logits, local_t, in_shard, lse)
        ctx.chunk, ctx.valid = chunk, valid
        return (picked - lse).view(targets.shape)

    @staticmethod
    def backward(ctx, grad_out):
        logits, local_t, in_shard, lse = ctx.saved_tensors
        v_local, valid = logits.shape[-1], ctx.valid
        g = grad_out.reshape(-1).float()
        # Padding columns get a zero gradient; the real ones are written in place below.
        alloc = torch.zeros if valid < v_local else torch.empty
        full = alloc(logits.numel() // v_local, v_local, dtype=logits.dtype, device=logits.device)
        if not valid:
            return full.view_as(logits), None, None, None, None
        x = logits.reshape(-1, v_local)[:, :valid]
        grad = full[:, :valid]
        if _use_compiled(x):
            kernel = _kernel(_logprob_grad, x)
            for s, e in _chunks(x.shape[0], ctx.chunk):
                grad[s:e] = kernel(x[s:e], lse[s:e], g[s:e], local_t[s:e], in_shard[s:e])
            return full.view_as(logits), None, None, None, None
        rows = torch.arange(x.shape[0], device=x.device)
        in_place = grad.dtype == torch.float32
        for s, e in _chunks(x.shape[0], ctx.chunk):
            if in_place:  # compute straight into the gradient: no temporary at all
                gc = torch.sub(x[s:e], lse[s:e, None], out=grad[s:e]).exp_()
            else:
                gc = _shifted_exp(x[s:e], lse[s:e])
            gc.mul_(-g[s:e, None])
            sel = in_shard[s:e]
            gc[rows[s:e][sel] - s, local_t[s:e][sel]] += g[s:e][sel]
            if not in_place:
                grad[s:e] = gc.to(grad.dtype)
        return full.view_as(logits), None, None, None, None


def vocab_parallel_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    tp_group=None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """fp32 ``log softmax(logits)[target]`` over a vocabulary sharded across ``tp_group``.

    ``logits``: ``[..., V/TP]`` (any float dtype), this rank's vocabulary slice;
    ``targets``: ``[...]`` global token ids. Returns fp32 ``[...]``; differentiable in logits.
    ``vocab_size``: the real vocabulary; ids at or above it (megatron's padding) are left out
    of the softmax, as samplers leave them out, and get zero gradient.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree: "
            "expected logits [..., V/TP] with targets [...]"
        )
    valid = _valid_columns(logits.shape[-1], vocab_size, tp_group)
    chunk = chunk_size or _default_chunk(logits.shape[-1])
    return _VocabParallelLogProbs.apply(logits, targets, tp_group, chunk, valid)


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tp_group, chunk, valid):
        v_local = logits.shape[-1]
        x = logits.reshape(-1, v_local)[:, :valid]
        lse = _logsumexp(x, chunk, tp_group)
        ex = torch.zeros_like(lse)  # E_p[x]
        for s, e in _chunks(x.shape[0], chunk) if valid else ():
            p = _shifted_exp(x[s:e], lse[s:e])
            ex[s:e] = (p.mul_(x[s:e])).sum(-1)
        _all_reduce(ex, dist.ReduceOp.SUM, tp_group)
        ctx.save_for_backward(logits, lse, ex)
        ctx.chunk, ctx.valid = chunk, valid
        return (lse - ex).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, ex = ctx.saved_tensors
        v_local, valid = logits.shape[-1], ctx.valid
        full = torch.zeros(logits.numel() // v_local, v_local, dtype=logits.dtype, device=logits.device)
        x = logits.reshape(-1, v_local)[:, :valid]
        g = grad_out.reshape(-1).float()
        grad = full[:, :valid]
        for s, e in _chunks(x.shape[0], ctx.chunk) if valid else ():
            p = _shifted_exp(x[s:e], lse[s:e])
            # dH/dx_j = -p_j (x_j - E_p[x])
            t = x[s:e].float().sub(ex[s:e, None])
            grad[s:e] = p.mul_(t).mul_(-g[s:e, None]).to(grad.dtype)
        return full.view_as(logits), None, None, None


def vocab_parallel_entropy(
    logits: torch.Tensor, *, tp_group=None, chunk_size: int | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """fp32 entropy of ``softmax(logits)`` per row over a TP-sharded vocabulary (real ids only)."""
    valid = _valid_columns(logits.shape[-1], vocab_size, tp_group)
    return _VocabParallelEntropy.apply(logits, tp_group, chunk_size or _default_chunk(logits.shape[-1]), valid)


@torch.no_grad()
def vocab_parallel_draft_agreement(
    main_logits: torch.Tensor,
    draft_logits: torch.Tensor,
    *,
    tp_group=None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected speculative acceptance ``Σ_v min(p_v, q_v)`` and top-1 agreement per row.

    ``p`` = softmax(main), ``q`` = softmax(draft), both ``[..., V/TP]`` shards of the same
    rows. Returns two fp32 tensors of shape ``[...]``.
    """
    chunk = chunk_size or _default_chunk(main_logits.shape[-1])
    v_local = main_logits.shape[-1]
    rank, world = _tp_info(tp_group)
    valid = _valid_columns(v_local, vocab_size, tp_group)
    p_x = main_logits.reshape(-1, v_local)[:, :valid]
    q_x = draft_logits.reshape(-1, v_local)[:, :valid]
    lse_p = _logsumexp(p_x, chunk, tp_group)
    lse_q = _logsumexp(q_x, chunk, tp_group)
    n = p_x.shape[0]
    accept = torch.zeros(n, dtype=torch.float32, device=p_x.device)
    for s, e in _chunks(n, chunk) if valid else ():
        p = _shifted_exp(p_x[s:e], lse_p[s:e])
        accept[s:e] = torch.minimum(p, _shifted_exp(q_x[s:e], lse_q[s:e]), out=p).sum(-1)
    _all_reduce(accept, dist.ReduceOp.SUM, tp_group)
    return accept.view(main_logits.shape[:-1]), (
        _vocab_parallel_argmax(p_x, rank, world, tp_group, v_local)
        == _vocab_parallel_argmax(q_x, rank, world, tp_group, v_local)
    ).float().view(main_logits.shape[:-1])


def _vocab_parallel_argmax(x: torch.Tensor, rank: int, world: int, tp_group, v_local: int) -> torch.Tensor:
    """Global argmax per row; ties go to the lowest token id, as torch.argmax does."""
    if x.shape[-1] == 0:  # a shard holding only padding
        vals = torch.full((x.shape[0],), float("-inf"), device=x.device)
        idx = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    else:
        vals, idx = x.float().max(dim=-1)
    idx = idx + rank * v_local
    if world == 1:
        return idx
    all_vals = [torch.empty_like(vals) for _ in range(world)]
    all_idx = [torch.empty_like(idx) for _ in range(world)]
    dist.all_gather(all_vals, vals, group=tp_group)
    dist.all_gather(all_idx, idx, group=tp_group)
    v = torch.stack(all_vals)  # [world, N]; shards are in rank order, so first max wins
    i = torch.stack(all_idx)
    best = v.argmax(dim=0)
    return i.gather(0, best[None]).squeeze(0)
