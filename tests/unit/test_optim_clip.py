"""The distributed-optimizer step path (clip on the optimizer's shard) against the default one.

On CPU megatron's distributed optimizer refuses non-CUDA parameters, so this runs the shard
path over the non-distributed optimizer, where the optimizer's main parameters are the whole
model: both paths must then compute the same per-group norms and the same update. The
distributed optimizer itself runs in tests/gpu.
"""

import pytest
import torch


def _model_and_optimizer(seed: int):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model, get_preset
    from megatron_mtp_rl.train.optim import build_optimizer, wrap_ddp
    from megatron_mtp_rl.train.schedule import configure

    platform.seed_everything(seed)
    gpt = build_model(get_preset("tiny-moe").with_overrides(vocab_size=64, seq_length=16))
    model = wrap_ddp(gpt)
    configure(model)
    return gpt, model, build_optimizer(model, lr=1e-2)


def _backward(model, gpt, scale: float) -> None:
    from megatron_mtp_rl.models import forward_logprobs, pack_sequences

    batch, _ = pack_sequences([([1, 2, 3], [4, 5, 6, 7]), ([8, 9], [10, 11, 12])], 16)
    model.zero_grad_buffer()
    out = forward_logprobs(model, batch)
    loss = -(out.logprobs[out.loss_mask].sum() + out.mtp_logprobs[out.mtp_mask].sum()) * scale
    loss.backward()
    model.finish_grad_sync()


@pytest.mark.parametrize("scale", [1e-3, 50.0])  # below and above the clip thresholds
def test_shard_path_matches_the_default_step(single_process, scale):
    from megatron_mtp_rl.train.optim import clip_grads, clip_sharded_and_step

    gpt_a, model_a, opt_a = _model_and_optimizer(7)
    gpt_b, model_b, opt_b = _model_and_optimizer(7)
    for a, b in zip(gpt_a.parameters(), gpt_b.parameters()):
        assert torch.equal(a, b)
    _backward(model_a, gpt_a, scale)
    _backward(model_b, gpt_b, scale)
    norms_a = clip_grads(model_a, 1.0, 0.5)
    ok_a, _, _ = opt_a.step()
    ok_b, norms_b = clip_sharded_and_step(opt_b, 1.0, 0.5)
    assert ok_a and ok_b
    assert norms_b.main == pytest.approx(norms_a.main, rel=1e-6)
    assert norms_b.mtp == pytest.approx(norms_a.mtp, rel=1e-6)
    assert norms_a.mtp > 0 and norms_a.main > 0
    for (name, a), b in zip(gpt_a.named_parameters(), gpt_b.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_shard_path_skips_non_finite_gradients(single_process):
    from megatron_mtp_rl.train.optim import clip_sharded_and_step

    gpt, model, opt = _model_and_optimizer(3)
    before = [p.detach().clone() for p in gpt.parameters()]
    _backward(model, gpt, float("nan"))
    ok, norms = clip_sharded_and_step(opt, 1.0, 1.0)
    assert not ok and norms.main != norms.main
    for a, b in zip(gpt.parameters(), before):
        assert torch.equal(a, b)
