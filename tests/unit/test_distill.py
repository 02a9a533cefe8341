"""vocab_parallel_kl against torch's dense kl_div: values and student gradients."""

import pytest
import torch
import torch.nn.functional as F

from megatron_mtp_rl.ops import vocab_parallel_kl


def _reference(student, teacher, vocab):
    logq = torch.log_softmax(student[..., :vocab].float(), -1)
    logp = torch.log_softmax(teacher[..., :vocab].float(), -1)
    return F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, None])
@pytest.mark.parametrize("vocab", [97, 90])  # 90: the last 7 columns are megatron's padding
def test_kl_matches_kl_div_values_and_grads(dtype, chunk, vocab):
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(4, 9, 97, generator=g) * 3).to(dtype).requires_grad_()
    teacher = (torch.randn(4, 9, 97, generator=g) * 3).to(dtype).requires_grad_()
    w = torch.randn(4, 9, generator=g)
    teacher_before = teacher.detach().clone()
    ours = vocab_parallel_kl(student, teacher, chunk_size=chunk, vocab_size=vocab)
    assert ours.dtype == torch.float32 and ours.shape == (4, 9)
    (ours * w).sum().backward()
    g_ours = student.grad.clone()
    assert teacher.grad is None  # the teacher (main head) is a constant target
    assert torch.equal(teacher.detach(), teacher_before)  # and is not modified in place
    student.grad = None
    ref = _reference(student, teacher.detach(), vocab)
    (ref * w).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(ours, ref.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(g_ours.float(), student.grad.float(), atol=tol, rtol=tol)
    assert g_ours.dtype == dtype
    assert (g_ours[..., vocab:] == 0).all()


def test_kl_is_zero_for_identical_distributions_and_rejects_shape_mismatch():
    x = torch.randn(3, 50)
    torch.testing.assert_close(vocab_parallel_kl(x + 2.0, x), torch.zeros(3), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_kl(torch.zeros(2, 5), torch.zeros(2, 6))
