"""PPO's arithmetic against hand-computed values: GAE, whitening, clipped losses, KL estimators and controllers, rewards."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.errors import UserError
from pipeline.losses.ppo import AdaptiveKLController, assemble_rewards, gae, kl_penalty, masked_whiten, policy_loss, value_loss


def test_gae_by_hand():
    values = torch.tensor([[1.0, 2.0], [0.5, 9.0]])
    rewards = torch.tensor([[0.0, 1.0], [1.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])  # the second response is one token long
    adv, ret = gae(values, rewards, mask, gamma=1.0, lam=0.95)
    # Row 0: delta_1 = 1 - 2 = -1; delta_0 = 0 + 2 - 1 = 1; A_0 = 1 + 0.95 * -1.
    torch.testing.assert_close(adv[0], torch.tensor([0.05, -1.0]))
    torch.testing.assert_close(ret[0], torch.tensor([1.05, 1.0]))
    # Row 1: padding adds nothing: A_0 = 1 - 0.5.
    torch.testing.assert_close(adv[1], torch.tensor([0.5, 0.0]))


def test_whitening_over_the_mask_only():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = masked_whiten(x, mask)
    assert w[0, 3] == 0
    assert abs(w[0, :3].mean().item()) < 1e-6 and abs(w[0, :3].var(unbiased=False).item() - 1) < 1e-4
    kept = masked_whiten(x, mask, shift_mean=False)
    assert kept[0, :3].mean().item() == pytest.approx(2.0, abs=1e-5)


def test_clipped_policy_loss_by_hand():
    old = torch.zeros(1, 1)
    new = torch.log(torch.tensor([[1.5]]))
    mask = torch.ones(1, 1)
    loss, clipfrac, approxkl = policy_loss(new, old, torch.ones(1, 1), mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and clipfrac.item() == 1.0  # ratio 1.5 clipped to 1.2
    assert approxkl.item() == pytest.approx(0.5 * math.log(1.5) ** 2)
    loss, clipfrac, _ = policy_loss(new, old, -torch.ones(1, 1), mask, clip=0.2)
    assert loss.item() == pytest.approx(1.5) and clipfrac.item() == 0.0  # pessimistic side unclipped


def test_clipped_value_loss_by_hand():
    loss, clipfrac = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), clip=0.2)
    # Clipped value 0.2: error 0.64 beats the unclipped 0.
    assert loss.item() == pytest.approx(0.32) and clipfrac.item() == 1.0


def test_kl_estimators_by_hand_and_on_samples():
    lp, ref = torch.tensor([-1.0]), torch.tensor([-2.0])
    assert kl_penalty(lp, ref, "k1").item() == pytest.approx(1.0)
    assert kl_penalty(lp, ref, "k2").item() == pytest.approx(0.5)
    assert kl_penalty(lp, ref, "k3").item() == pytest.approx(math.exp(-1.0))
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    true_kl = (p * (p / q).log()).sum().item()
    samples = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        estimate = kl_penalty(p.log()[samples], q.log()[samples], kind).mean().item()
        assert estimate == pytest.approx(true_kl, rel=0.03), kind
    assert (kl_penalty(p.log()[samples], q.log()[samples], "k3") >= 0).all()
    with pytest.raises(UserError, match="k1, k2 or k3"):
        kl_penalty(lp, ref, "k9")


def test_adaptive_kl_moves_towards_the_target():
    ctl = AdaptiveKLController(0.1, target=4.0, horizon=100)
    ctl.update(current_kl=8.0, n_steps=10)
    assert ctl.value == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(current_kl=1.0, n_steps=10)
    assert ctl.value < 0.1 * (1 + 0.2 * 10 / 100)


def test_rewards_put_the_score_on_the_last_token_and_kl_everywhere():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    lp = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    ref = lp - 0.5
    rewards, kl = assemble_rewards(torch.tensor([2.0, 3.0]), lp, ref, mask, kl_coef=0.1, kl_estimator="k1")
    torch.testing.assert_close(rewards, torch.tensor([[-0.05, -0.05, 1.95], [2.95, 0.0, 0.0]]))
    assert kl.sum().item() == pytest.approx(2.0)
