"""vocab_parallel_kl at TP=2 (2 gloo processes) equals the dense kl_div on the full vocabulary."""

import pytest
import torch
import torch.nn.functional as F

from tests.dist_utils import run_ranks

V = 96


def _inputs(vocab):
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 9, V, generator=g) * 3
    teacher = torch.randn(4, 9, V, generator=g) * 3
    w = torch.randn(4, 9, generator=g)
    return student, teacher, w


def _worker(rank, world):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.ops import vocab_parallel_kl

    platform.initialize(platform.ParallelSizes(tensor_model_parallel_size=world), seed=0)
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for vocab in (V, 40):  # 40: rank 1's shard holds only padding
        student, teacher, w = _inputs(vocab)
        shard = student.chunk(world, dim=-1)[rank].clone().requires_grad_()
        t_shard = teacher.chunk(world, dim=-1)[rank].clone()
        for chunk in (1, 5, None):
            kl = vocab_parallel_kl(shard, t_shard, tp_group=tp, chunk_size=chunk, vocab_size=vocab)
            (kl * w).sum().backward()
            out[(vocab, chunk)] = (kl.detach(), shard.grad.clone())
            shard.grad = None
    return out


@pytest.mark.slow  # TP=2: test_two_process_job[tp2] and the log-prob tests are the fast ones
def test_vocab_parallel_kl_tp2(tmp_path):
    results = run_ranks(_worker, 2, tmp_path)
    for vocab in (V, 40):
        student, teacher, w = _inputs(vocab)
        student.requires_grad_()
        logq = torch.log_softmax(student[..., :vocab], -1)
        logp = torch.log_softmax(teacher[..., :vocab], -1)
        ref = F.kl_div(logq, logp, reduction="none", log_target=True).sum(-1)
        (ref * w).sum().backward()
        for rank, res in enumerate(results):
            for chunk in (1, 5, None):
                kl, grad = res[(vocab, chunk)]
                torch.testing.assert_close(kl, ref.detach(), atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(grad, student.grad.chunk(2, dim=-1)[rank], atol=1e-5, rtol=1e-5)
