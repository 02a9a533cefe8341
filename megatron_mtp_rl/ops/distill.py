"""KL(p ‖ q) between two TP-sharded logit tensors, chunked: the MTP self-distillation loss.

``p`` = softmax(teacher logits) is a constant (the main head, detached); ``q`` =
softmax(student logits) is the MTP head being trained. Per row

    KL = Σ_v p_v (x_v − y_v) − lse(x) + lse(y),      ∂KL/∂y_v = q_v − p_v,

so the forward needs the two global log-sum-exps (each two all-reduces over TP, for the
whole batch) and one all-reduced per-row sum; the backward writes ``q − p`` chunk by
chunk into the student's gradient. No full-vocabulary tensor is gathered, and the extra
memory beyond the logits and the student gradient is O(chunk × V/TP) fp32, as in
:func:`~megatron_mtp_rl.ops.vocab_parallel_logprobs`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_mtp_rl.ops.logprobs import (
    _all_reduce,
    _chunks,
    _default_chunk,
    _logsumexp,
    _shifted_exp,
    _valid_columns,
)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, tp_group, chunk, valid):
        v_local = student.shape[-1]
        y = student.reshape(-1, v_local)[:, :valid]
        x = teacher.reshape(-1, v_local)[:, :valid]
        lse_x = _logsumexp(x, chunk, tp_group)
        lse_y = _logsumexp(y, chunk, tp_group)
        cross = torch.zeros_like(lse_x)  # Σ_v p_v (x_v − y_v), this shard's part
        for s, e in _chunks(x.shape[0], chunk) if valid else ():
            p = _shifted_exp(x[s:e], lse_x[s:e])  # the one chunk-sized temporary (fp32 inputs)
            cross[s:e] = torch.einsum("nv,nv->n", p, x[s:e].float()) - torch.einsum("nv,nv->n", p, y[s:e].float())
        _all_reduce(cross, dist.ReduceOp.SUM, tp_group)
        ctx.save_for_backward(student, teacher, lse_x, lse_y)
        ctx.chunk, ctx.valid = chunk, valid
        return (cross - lse_x + lse_y).view(student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, lse_x, lse_y = ctx.saved_tensors
        v_local, valid = student.shape[-1], ctx.valid
        full = torch.zeros(student.numel() // v_local, v_local, dtype=student.dtype, device=student.device)
        y = student.reshape(-1, v_local)[:, :valid]
        x = teacher.reshape(-1, v_local)[:, :valid]
        g = grad_out.reshape(-1).float()
        grad = full[:, :valid]
        in_place = grad.dtype == torch.float32
        for s, e in _chunks(y.shape[0], ctx.chunk) if valid else ():
            if in_place:  # q straight into the gradient; p is the one temporary
                gc = torch.sub(y[s:e], lse_y[s:e, None], out=grad[s:e]).exp_()
            else:
                gc = _shifted_exp(y[s:e], lse_y[s:e])
            gc.sub_(_shifted_exp(x[s:e], lse_x[s:e])).mul_(g[s:e, None])
            if not in_place:
                grad[s:e] = gc.to(grad.dtype)
        return full.view_as(student), None, None, None, None


def vocab_parallel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    tp_group=None,
    chunk_size: int | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """fp32 ``KL(softmax(teacher) ‖ softmax(student))`` per row over a TP-sharded vocabulary.

    Both ``[..., V/TP]`` shards of the same rows; differentiable in ``student_logits`` only
    (the teacher is a target: it is detached here). ``vocab_size``: the real vocabulary;
    megatron's padding columns are left out of both softmaxes and get zero gradient.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} disagree: expected the same [..., V/TP] shape"
        )
    valid = _valid_columns(student_logits.shape[-1], vocab_size, tp_group)
    chunk = chunk_size or _default_chunk(student_logits.shape[-1])
    return _VocabParallelKL.apply(student_logits, teacher_logits.detach(), tp_group, chunk, valid)
