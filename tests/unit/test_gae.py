"""GAE against hand computations: γ = 1 and γ < 1, with and without masked (tool) spans."""

import pytest
import torch

from megatron_mtp_rl.rl.advantages import compute_gae

V = torch.tensor([[0.5, 0.2, 0.4]])
R = torch.tensor([[0.0, 0.0, 1.0]])  # outcome reward on the last token
ALL = torch.ones(1, 3, dtype=torch.bool)


def test_gamma_one_lambda_one_is_reward_to_go_minus_value():
    adv, ret = compute_gae(R, V, ALL, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.8, 0.6])  # 1 - V_t
    assert ret[0].tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_gamma_and_lambda_below_one():
    g, lam = 0.9, 0.8
    adv, ret = compute_gae(R, V, ALL, gamma=g, lam=lam)
    a2 = 1.0 - 0.4  # δ_2 = r_2 - V_2
    a1 = (0.0 + g * 0.4 - 0.2) + g * lam * a2  # 0.16 + 0.432
    a0 = (0.0 + g * 0.2 - 0.5) + g * lam * a1  # -0.32 + 0.72 * 0.592
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.2, a2 + 0.4])


def test_masked_span_is_skipped_by_the_recursion():
    g, lam = 0.9, 0.8
    v = torch.tensor([[0.5, 9.0, 9.0, 0.4, 7.0]])  # tokens 1-2: tool output; 4: padding
    r = torch.tensor([[0.0, 5.0, 5.0, 1.0, 3.0]])  # what masked tokens hold must not matter
    mask = torch.tensor([[True, False, False, True, False]])
    adv, ret = compute_gae(r, v, mask, gamma=g, lam=lam)
    a3 = 1.0 - 0.4
    a0 = (0.0 + g * 0.4 - 0.5) + g * lam * a3  # token 3 is the next token of token 0
    assert adv[0].tolist() == pytest.approx([a0, 0.0, 0.0, a3, 0.0])
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, 9.0, 9.0, a3 + 0.4, 7.0])
    # the same as the two policy tokens alone
    alone, _ = compute_gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.4]]), torch.ones(1, 2), gamma=g, lam=lam)
    assert adv[mask].tolist() == pytest.approx(alone.flatten().tolist())


def test_rows_are_independent_and_shapes_checked():
    v = torch.cat([V, torch.tensor([[0.1, 0.1, 0.1]])])
    r = torch.cat([R, torch.tensor([[0.0, 2.0, 0.0]])])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    adv, _ = compute_gae(r, v, mask, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx([0.5, 0.8, 0.6])
    assert adv[1].tolist() == pytest.approx([1.9, 1.9, 0.0])  # reward 2 on token 1; token 2 padding
    with pytest.raises(ValueError, match="one shape"):
        compute_gae(R, V[:, :2], ALL, gamma=1.0, lam=1.0)


def test_gae_estimator_folds_the_kl_into_the_rewards_and_whitens():
    from types import SimpleNamespace

    from megatron_mtp_rl.rl.advantages import AdvantageInputs, gae, gae_returns

    algo = SimpleNamespace(gamma=1.0, lam=1.0, kl_coef=0.5, kl_type="k1")
    mask = torch.tensor([[True, True, False], [True, True, True]])
    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-1.0, -1.0, -1.0]])  # KL_k1 = old - ref = 0.5 on token 0 of sample 0
    values = torch.tensor([[0.2, 0.1, 0.0], [0.3, 0.3, 0.3]])
    x = AdvantageInputs(torch.tensor([1.0, 0.0]), 2, algo, mask, old_logprobs=old, ref_logprobs=ref, values=values)
    ret = gae_returns(x)
    # γ = λ = 1: R_t = Σ_{s ≥ t} r_s; sample 0: r = [-0.25, 1] (reward on its last policy token)
    assert ret[0, :2].tolist() == pytest.approx([0.75, 1.0]) and ret[1].tolist() == pytest.approx([0.0, 0.0, 0.0])
    raw = (ret - values)[mask]
    adv = gae(x)
    assert adv[mask].tolist() == pytest.approx(((raw - raw.mean()) / raw.std()).tolist(), rel=1e-5)
    assert adv[0, 2] == 0.0
