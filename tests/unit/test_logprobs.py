"""vocab_parallel_logprobs / entropy / draft agreement against full-vocabulary references."""

import pytest
import torch

from megatron_mtp_rl.ops import (
    vocab_parallel_draft_agreement,
    vocab_parallel_entropy,
    vocab_parallel_logprobs,
)


def _reference(logits, targets):
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[..., None]).squeeze(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 7, 64, None])
def test_logprobs_match_log_softmax_values_and_grads(dtype, chunk):
    torch.manual_seed(0)
    logits = (torch.randn(3, 11, 97) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, 97, (3, 11))
    weights = torch.randn(3, 11)

    ours = vocab_parallel_logprobs(logits, targets, chunk_size=chunk)
    assert ours.dtype == torch.float32 and ours.shape == targets.shape
    (ours * weights).sum().backward()
    g_ours = logits.grad.clone()
    logits.grad = None

    ref = _reference(logits, targets)
    (ref * weights).sum().backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours, ref, atol=tol, rtol=tol)
    torch.testing.assert_close(g_ours.float(), logits.grad.float(), atol=tol, rtol=tol)
    assert g_ours.dtype == dtype


def test_entropy_matches_reference_values_and_grads():
    torch.manual_seed(1)
    logits = torch.randn(5, 4, 33, requires_grad=True)
    w = torch.randn(5, 4)
    ours = vocab_parallel_entropy(logits, chunk_size=3)
    (ours * w).sum().backward()
    g = logits.grad.clone()
    logits.grad = None
    logp = torch.log_softmax(logits, -1)
    ref = -(logp.exp() * logp).sum(-1)
    (ref * w).sum().backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, logits.grad, atol=1e-5, rtol=1e-5)


def test_draft_agreement_matches_reference():
    torch.manual_seed(2)
    p_logits = torch.randn(6, 20)
    q_logits = p_logits + 0.5 * torch.randn(6, 20)
    q_logits[0] = p_logits[0]  # identical distributions accept with probability 1
    accept, top1 = vocab_parallel_draft_agreement(p_logits, q_logits, chunk_size=4)
    p, q = p_logits.softmax(-1), q_logits.softmax(-1)
    torch.testing.assert_close(accept, torch.minimum(p, q).sum(-1))
    assert accept[0].item() == pytest.approx(1.0, abs=1e-6)
    assert torch.equal(top1, (p.argmax(-1) == q.argmax(-1)).float())


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected logits \[\.\.\., V/TP\]"):
        vocab_parallel_logprobs(torch.randn(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_vocabulary_is_left_out(dtype):
    """Ids ≥ vocab_size (megatron's padding) take no probability mass and get no gradient."""
    torch.manual_seed(3)
    logits = (torch.randn(4, 5, 16) * 2).to(dtype).requires_grad_()
    targets = torch.randint(0, 11, (4, 5))
    lp = vocab_parallel_logprobs(logits, targets, chunk_size=3, vocab_size=11)
    ent = vocab_parallel_entropy(logits, vocab_size=11)
    (lp.sum() + ent.sum()).backward()
    ref = torch.log_softmax(logits.detach().float()[..., :11], -1)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(lp, ref.gather(-1, targets[..., None]).squeeze(-1), atol=tol, rtol=tol)
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1), atol=tol, rtol=tol)
    assert logits.grad[..., 11:].abs().sum() == 0 and logits.grad[..., :11].abs().sum() > 0
    accept, _ = vocab_parallel_draft_agreement(logits.detach(), logits.detach() + 0.1, vocab_size=11)
    p = ref.exp()
    q = torch.softmax(logits.detach().float()[..., :11] + 0.1, -1)
    torch.testing.assert_close(accept, torch.minimum(p, q).sum(-1), atol=tol, rtol=tol)


@pytest.mark.slow  # inductor compiles C++ on the CPU: ~30 s on 2 idle cores
def test_compiled_kernels_match_the_reference(monkeypatch):
    """MTP_RL_COMPILE_LOGPROBS=1: the torch.compile'd chunk kernels give the eager values and gradients."""
    monkeypatch.setenv("MTP_RL_COMPILE_LOGPROBS", "1")
    from megatron_mtp_rl.ops import logprobs as ops

    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        torch.manual_seed(4)
        logits = (torch.randn(5, 7, 20) * 3).to(dtype).requires_grad_()
        targets = torch.randint(0, 17, (5, 7))
        weights = torch.randn(5, 7)
        lp = vocab_parallel_logprobs(logits, targets, chunk_size=8, vocab_size=17)  # a tail chunk of 3 rows
        (lp * weights).sum().backward()
        ref = torch.log_softmax(logits.detach().double()[..., :17], -1)
        ref_lp = ref.gather(-1, targets[..., None]).squeeze(-1)
        onehot = torch.nn.functional.one_hot(targets, 17).double()
        ref_grad = weights.double()[..., None] * (onehot - ref.exp())
        torch.testing.assert_close(lp.double(), ref_lp, atol=tol, rtol=tol)
        torch.testing.assert_close(logits.grad[..., :17].double(), ref_grad, atol=tol, rtol=tol)
        assert logits.grad.dtype == dtype and logits.grad[..., 17:].abs().sum() == 0
    assert ops._compiled.get("_lse_and_pick") not in (None, False)  # it ran compiled, not the fallback
    assert ops._compiled.get("_logprob_grad") not in (None, False)
