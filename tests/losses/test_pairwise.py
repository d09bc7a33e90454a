"""Bradley-Terry by hand: the reward model's loss with and without margin and centring."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses.pairwise import pairwise_loss


def test_loss_is_minus_log_sigmoid_of_the_score_difference():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])
    # -log sigmoid(1) = log(1 + e^-1); -log sigmoid(0) = log 2
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert math.isclose(pairwise_loss(chosen, rejected).item(), expected, rel_tol=1e-6)


def test_margin_is_subtracted_from_the_difference():
    chosen, rejected, margin = torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([2.0])
    assert math.isclose(pairwise_loss(chosen, rejected, margin).item(), math.log(2), rel_tol=1e-6)


def test_centring_adds_the_mean_squared_sum_of_the_two_scores():
    chosen, rejected = torch.tensor([1.0, -1.0]), torch.tensor([0.0, -3.0])
    plain = pairwise_loss(chosen, rejected).item()
    # (1 + 0)^2 = 1 and (-1 - 3)^2 = 16: mean 8.5, times 0.1
    assert math.isclose(pairwise_loss(chosen, rejected, center_coef=0.1).item(), plain + 0.85, rel_tol=1e-6)


def test_a_wider_right_margin_lowers_the_loss_and_a_wrong_ranking_raises_it():
    rejected = torch.zeros(1)
    losses = [pairwise_loss(torch.tensor([d]), rejected).item() for d in (-2.0, 0.0, 2.0, 6.0)]
    assert losses == sorted(losses, reverse=True) and losses[-1] < 0.01


def test_pairwise_loss_on_hand_made_pairs():
    chosen, rejected = torch.tensor([2.0, 0.5]), torch.tensor([0.0, 1.5])
    expected = (-math.log(1 / (1 + math.exp(-2.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert pairwise_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-5)
    with_margin = pairwise_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0]))
    assert with_margin.item() == pytest.approx((-F.logsigmoid(torch.tensor(1.0)) - F.logsigmoid(torch.tensor(-1.0))).item() / 2, rel=1e-5)
    centred = pairwise_loss(chosen, rejected, center_coef=0.1)
    assert centred.item() == pytest.approx(expected + 0.1 * ((2.0**2) + (2.0**2)) / 2, rel=1e-5)
