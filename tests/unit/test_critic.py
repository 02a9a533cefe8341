"""The critic: value head on megatron's GPTModel, clipped value loss, update, save/load (one process)."""

import shutil
from types import SimpleNamespace

import pytest
import torch

from megatron_mtp_rl.rl.value_loss import clipped_value_loss


def test_clipped_value_loss_by_hand():
    v = torch.tensor([1.0, 0.5, -0.1])
    old = torch.tensor([0.0, 0.4, 0.0])
    ret = torch.tensor([0.0, 1.0, 1.0])
    t = clipped_value_loss(v, old, ret, value_clip=0.2)
    # token 0: V moved 1.0 away from V_old: held at 0.2, loss max(1, 0.04)/2; token 1: inside the clip;
    # token 2: held at -0.1 (inside), same error either way
    assert t.loss.tolist() == pytest.approx([0.5, 0.125, 0.605])
    assert t.clipped.tolist() == [False, False, False]
    v2 = torch.tensor([0.9, 0.0, 0.0])  # token 0 moves towards R=1 from V_old=0 by 0.9: held at 0.2
    t2 = clipped_value_loss(v2, torch.zeros(3), torch.ones(3), value_clip=0.2)
    assert t2.loss.tolist() == pytest.approx([0.5 * 0.8**2, 0.5, 0.5])
    assert t2.clipped.tolist() == [True, False, False]
    assert clipped_value_loss(v2, torch.zeros(3), torch.ones(3), 0.0).loss.tolist() == pytest.approx([0.005, 0.5, 0.5])


def _args():
    from megatron_mtp_rl.models import get_preset

    return get_preset("tiny-dense").with_overrides(vocab_size=64, seq_length=16)


def _batches():
    from megatron_mtp_rl.models import pack_sequences
    from megatron_mtp_rl.rl.loss import RLBatch

    batch, _ = pack_sequences([([1, 2, 3], [4, 5, 6, 7]), ([8, 9], [10, 11, 12])], 16)
    rl = RLBatch(**batch.__dict__)
    rl.returns = torch.where(rl.loss_mask, 1.0, 0.0)
    return [rl]


@pytest.fixture(scope="module")
def critic_and_policy(single_process):
    from megatron_mtp_rl import platform
    from megatron_mtp_rl.models import build_model
    from megatron_mtp_rl.train.critic import copy_trunk, create_critic

    platform.seed_everything(3)
    policy = build_model(_args())
    critic = create_critic(_args(), lr=3e-2, value_clip=0.5)
    copy_trunk(policy, critic.gpt)
    critic.optimizer.reload_model_params()
    # the critic as built, before another test of this file (in any order) updates it
    critic.initial = {n: p.detach().clone() for n, p in critic.gpt.named_parameters()}
    return critic, policy


def test_value_model_is_the_policy_trunk_with_a_scalar_head(critic_and_policy):
    critic, policy = critic_and_policy
    mine = dict(policy.named_parameters())
    names = [n for n, _ in critic.gpt.named_parameters()]
    assert not any(n.startswith("mtp.") for n in names)
    assert critic.gpt.output_layer.weight.shape == (1, 64)
    for n, p in critic.initial.items():
        if not n.startswith("output_layer."):
            assert torch.equal(p, mine[n]), n
    (values,) = critic.values(_batches())
    assert values.shape == (1, 16) and values.dtype == torch.float32 and torch.isfinite(values).all()


def test_updates_fit_the_returns_then_save_and_load_round_trip(critic_and_policy, tmp_path):
    from megatron_mtp_rl.errors import ConfigError
    from megatron_mtp_rl.train.checkpoint import load_checkpoint, save_checkpoint
    from megatron_mtp_rl.train.critic import create_critic, init_critic, load_trunk
    from megatron_mtp_rl.train.step import reduce_metrics

    critic, policy = critic_and_policy
    batches = _batches()
    losses = []
    for _ in range(6):
        (batches[0].values,) = critic.values(batches)
        results, norms, stepped = critic.update(batches)
        m = reduce_metrics(results)
        assert stepped and norms.main > 0 and 0.0 <= m["critic/clipfrac"] <= 1.0
        losses.append(m["critic/value_loss"])
    assert losses[-1] < 0.5 * losses[0]

    parts = {"critic": (critic.model, critic.optimizer)}
    save_checkpoint(str(tmp_path / "run"), 1, policy, None, {"step": 1}, parts=parts)
    fresh = create_critic(_args(), lr=3e-2, value_clip=0.5)
    load_checkpoint(str(tmp_path / "run"), fresh.model, fresh.optimizer, part="critic")
    assert torch.equal(fresh.values(batches)[0], critic.values(batches)[0])
    # a policy checkpoint: its trunk under a fresh head
    other = create_critic(_args(), lr=3e-2, value_clip=0.5)
    head = other.gpt.output_layer.weight.clone()
    load_trunk(tmp_path / "run" / "iter_0000001", other.gpt)
    assert torch.equal(other.gpt.output_layer.weight, head)
    assert torch.equal(other.gpt.decoder.final_layernorm.weight, policy.decoder.final_layernorm.weight)

    # --critic-load: a run's checkpoint gives its critic; a policy-only one its trunk
    cfg = SimpleNamespace(ckpt=SimpleNamespace(load=None, finetune=False, critic_load=str(tmp_path / "run")))
    loaded = create_critic(_args(), lr=3e-2, value_clip=0.5)
    assert init_critic(cfg, loaded, SimpleNamespace(model_args=_args())).endswith("critic")
    assert torch.equal(loaded.values(batches)[0], critic.values(batches)[0])
    shutil.rmtree(tmp_path / "run" / "iter_0000001" / "critic")
    (tmp_path / "run" / "iter_0000001" / "manifest.json").unlink()
    assert "policy trunk" in init_critic(cfg, loaded, SimpleNamespace(model_args=_args()))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    hf = SimpleNamespace(ckpt=SimpleNamespace(load=None, finetune=False, critic_load=str(tmp_path / "hf")))
    with pytest.raises(ConfigError, match="is an HF directory"):
        init_critic(hf, loaded, SimpleNamespace(model_args=_args()))


def test_config_refuses_what_the_critic_cannot_do():
    from megatron_mtp_rl.config import parse_config, validate

    def problems(*flags):
        return " | ".join(validate(parse_config(list(flags)), 2))

    assert "--critic-lr: only with --advantage-estimator gae" in problems("--critic-lr", "1e-4")
    pp = problems("--advantage-estimator", "gae", "--pipeline-model-parallel-size", "2", "--rollout-engine", "sglang")
    assert "the critic runs with --pipeline-model-parallel-size 1 only" in pp
    assert problems("--advantage-estimator", "gae", "--critic-warmup-steps", "2") == ""
