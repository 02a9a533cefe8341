"""TP=2 over 2 gloo processes: log-prob op and whole-model log-probs equal TP=1."""

import pytest
import torch

from tests.dist_utils import run_ranks

V = 96


def _op_worker(rank, world, dtype, vocab_size=None):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.ops import vocab_parallel_entropy, vocab_parallel_logprobs

    platform.initialize(platform.ParallelSizes(tensor_model_parallel_size=world), seed=0)
    from megatron.core import parallel_state

    g = torch.Generator().manual_seed(0)
    full = (torch.randn(4, 9, V, generator=g) * 3).to(dtype)
    targets = torch.randint(0, vocab_size or V, (4, 9), generator=g)
    w = torch.randn(4, 9, generator=g)
    shard = full.chunk(world, dim=-1)[rank].clone().requires_grad_()
    tp = parallel_state.get_tensor_model_parallel_group()
    out = {}
    for chunk in (1, 5, None):
        lp = vocab_parallel_logprobs(shard, targets, tp_group=tp, chunk_size=chunk, vocab_size=vocab_size)
        ent = vocab_parallel_entropy(shard, tp_group=tp, chunk_size=chunk, vocab_size=vocab_size)
        (lp * w + ent).sum().backward()
        out[chunk] = (lp.detach(), ent.detach(), shard.grad.clone())
        shard.grad = None
    return out


def _check_op(tmp_path, dtype, tol, vocab_size=None):
    results = run_ranks(_op_worker, 2, tmp_path, dtype, vocab_size)
    g = torch.Generator().manual_seed(0)
    full = (torch.randn(4, 9, V, generator=g) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab_size or V, (4, 9), generator=g)
    w = torch.randn(4, 9, generator=g)
    real = full[..., : vocab_size or V]
    logp = torch.log_softmax(real.float(), -1)
    ref_lp = logp.gather(-1, targets[..., None]).squeeze(-1)
    ref_ent = -(logp.exp() * logp).sum(-1)
    (ref_lp * w + ref_ent).sum().backward()
    for rank, res in enumerate(results):
        for lp, ent, grad in res.values():
            torch.testing.assert_close(lp, ref_lp.detach(), atol=tol, rtol=tol)
            torch.testing.assert_close(ent, ref_ent.detach(), atol=tol, rtol=tol)
            ref_grad = full.grad.chunk(2, dim=-1)[rank]  # zero on padding columns
            torch.testing.assert_close(grad.float(), ref_grad.float(), atol=tol, rtol=tol)


@pytest.mark.slow  # TP=2 log-probs: the padded-vocabulary case stays fast
def test_vocab_parallel_logprobs_tp2_fp32(tmp_path):
    _check_op(tmp_path, torch.float32, 1e-5)


@pytest.mark.slow  # TP=2 log-probs: the padded-vocabulary case stays fast
def test_vocab_parallel_logprobs_tp2_bf16(tmp_path):
    _check_op(tmp_path, torch.bfloat16, 2e-2)


def test_vocab_parallel_logprobs_tp2_with_padding(tmp_path):
    _check_op(tmp_path / "part", torch.float32, 1e-5, vocab_size=70)  # rank 1 holds 22 real ids
    _check_op(tmp_path / "none", torch.float32, 1e-5, vocab_size=40)  # rank 1 holds only padding


def _model_worker(rank, world, preset):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, forward_logprobs, get_preset, pack_sequences

    platform.initialize(platform.ParallelSizes(tensor_model_parallel_size=world), seed=7)
    model = build_model(get_preset(preset))
    g = torch.Generator().manual_seed(3)
    seqs = [
        (
            torch.randint(1, 60, (4,), generator=g).tolist(),
            torch.randint(1, 60, (6,), generator=g).tolist(),
        )
        for _ in range(5)
    ]
    batch, _ = pack_sequences(seqs, 24)
    out = forward_logprobs(model, batch, with_entropy=True, with_draft_stats=True)
    loss = -(out.logprobs[out.loss_mask].sum() + out.mtp_logprobs[out.mtp_mask].sum())
    loss.backward()
    emb_grad = model.embedding.word_embeddings.weight.grad
    return {
        "logprobs": out.logprobs.detach(),
        "mtp_logprobs": out.mtp_logprobs.detach(),
        "entropy": out.entropy.detach(),
        "accept": out.mtp_accept,
        "top1": out.mtp_top1,
        "emb_grad": emb_grad.clone(),
    }


def test_model_logprobs_tp2_equal_tp1(tmp_path):
    tp1 = run_ranks(_model_worker, 1, tmp_path / "tp1", "tiny-dense")[0]
    tp2 = run_ranks(_model_worker, 2, tmp_path / "tp2", "tiny-dense")
    for r, res in enumerate(tp2):
        for key in ("logprobs", "mtp_logprobs", "entropy", "accept", "top1"):
            torch.testing.assert_close(res[key], tp1[key], atol=1e-5, rtol=0, msg=f"{key} rank{r}")
        # Embedding rows are vocab-sharded: each rank holds its half of the TP=1 gradient.
        ref = tp1["emb_grad"].chunk(2, dim=0)[r]
        torch.testing.assert_close(res["emb_grad"], ref, atol=1e-5, rtol=1e-4)
    assert tp1["mtp_logprobs"].abs().sum() > 0
