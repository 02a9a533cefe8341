"""The colocated hand-off's trainer side: offload frees every parameter, gradient and optimizer-state
storage, onload restores them bit for bit, and training continues exactly as without the round trip."""

import torch

from megatron_mtp_rl.cluster.offload import TrainerOffload


def _model_and_optimizer():
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.train.optim import build_optimizer, wrap_ddp

    gpt = build_model(get_preset("tiny-dense"))
    model = wrap_ddp(gpt, use_distributed_optimizer=False)
    return model, build_optimizer(model, lr=1e-2, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.99)


def _step(model, optimizer):
    model.zero_grad_buffer()
    optimizer.zero_grad()
    dev = next(model.parameters()).device
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]], device=dev)
    out = model(tokens, torch.arange(6, device=dev)[None], None)
    out.float().logsumexp(-1).mean().backward()
    model.finish_grad_sync()
    optimizer.step()


def _snapshot(model, optimizer):
    from megatron_mtp_rl.cluster.offload import _tensors

    return [t.detach().clone() for t in _tensors(model, optimizer)]


def test_offload_onload_is_bit_identical_and_training_continues_exactly(single_process):
    model, optimizer = _model_and_optimizer()
    twin = _model_and_optimizer()
    with torch.no_grad():
        for p, q in zip(model.parameters(), twin[0].parameters()):
            q.copy_(p)
    _step(model, optimizer)  # optimizer state exists
    _step(*twin)
    before = _snapshot(model, optimizer)
    hand = TrainerOffload(model, optimizer)
    assert len(before) > 3
    hand.offload()
    assert hand.offloaded and sum(h.numel() for _, h in hand._saved) > 0
    from megatron_mtp_rl.cluster.offload import _tensors

    with torch.no_grad():  # the memory is the engines' meanwhile: what comes back must be the host copy
        for t in _tensors(model, optimizer):
            t.reshape(-1).view(torch.uint8).fill_(0xFF) if t.dim() else t.fill_(7)
    hand.onload()
    after = _snapshot(model, optimizer)
    assert len(after) == len(before)
    assert all(
        torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)) for a, b in zip(before, after)
    )
    _step(model, optimizer)
    _step(*twin)
    for p, q in zip(model.parameters(), twin[0].parameters()):
        assert torch.equal(p, q)
