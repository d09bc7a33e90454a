"""GRPO's and RLOO's arithmetic against hand-computed values, and the group-normalised advantage against TRL's formula."""

from __future__ import annotations

import ast
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.losses.grpo import group_advantages, grpo_loss, kl_in_reward, zero_signal_groups
from pipeline.losses.ppo import policy_loss


def test_baselines_by_hand():
    rewards = torch.tensor([1.0, 2.0, 6.0])  # one prompt, G = 3: mean 3, deviations -2, -1, 3
    # Unbiased variance (4 + 1 + 9) / (3 - 1) = 7.
    expected = torch.tensor([-2.0, -1.0, 3.0]) / (math.sqrt(7.0) + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, 3, "group_norm"), expected)
    torch.testing.assert_close(group_advantages(rewards, 3, "mean"), torch.tensor([-2.0, -1.0, 3.0]))
    # Leave-one-out: 1 - (2 + 6) / 2, 2 - (1 + 6) / 2, 6 - (1 + 2) / 2; = 3/2 * the deviations.
    torch.testing.assert_close(group_advantages(rewards, 3, "rloo"), torch.tensor([-3.0, -1.5, 4.5]))


def test_groups_are_prompt_major_and_a_uniform_group_gets_nothing():
    rewards = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0])  # rows 0-2 are prompt 0, rows 3-5 prompt 1
    for baseline in ("group_norm", "mean", "rloo"):
        advantages = group_advantages(rewards, 3, baseline)
        assert advantages[3:].tolist() == [0.0, 0.0, 0.0], baseline  # the eps keeps 0 / 0 out of group_norm
        torch.testing.assert_close(advantages[:3], group_advantages(rewards[:3], 3, baseline))
    assert zero_signal_groups(rewards, 3) == 1
    assert zero_signal_groups(torch.tensor([0, 0, 1, 1]), 2) == 2  # integer scores work too
    assert zero_signal_groups(torch.tensor([0.0, 1.0, 1.0, 0.0]), 2) == 0


def test_group_errors_name_the_setting():
    with pytest.raises(UserError, match="grpo.baseline must be group_norm, mean or rloo, not 'ppo'"):
        group_advantages(torch.zeros(4), 2, "ppo")
    with pytest.raises(UserError, match="at least 2 samples per prompt"):
        group_advantages(torch.zeros(4), 1, "rloo")
    with pytest.raises(ValueError, match="5 rewards do not split into groups of 3"):
        group_advantages(torch.zeros(5), 3, "mean")
    with pytest.raises(ValueError, match="groups of 2"):
        zero_signal_groups(torch.zeros(3), 2)


def _trl_function(module: str, name: str):
    """A function from the installed TRL's source, compiled alone: importing trl itself takes seconds."""
    spec = importlib.util.find_spec("trl")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("trl is not installed")
    path = Path(spec.submodule_search_locations[0], *module.split(".")).with_suffix(".py")
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    if not nodes:
        pytest.skip(f"the installed trl has no {name} in {path}")
    namespace = {"torch": torch}
    exec(compile(ast.Module(body=nodes, type_ignores=[]), str(path), "exec"), namespace)
    return namespace[name]


def test_group_norm_equals_trl_grpo_trainer():
    nanstd = _trl_function("trainer.utils", "nanstd")
    G = 4
    rewards = torch.rand(8 * G, generator=torch.Generator().manual_seed(0)) * 3
    # trl/trainer/grpo_trainer.py, _generate_and_score_completions, scale_rewards="group":
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    std_rewards = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G, dim=0)
    trl_advantages = (rewards - mean_grouped_rewards) / (std_rewards + 1e-4)
    torch.testing.assert_close(group_advantages(rewards, G, "group_norm"), trl_advantages)
    torch.testing.assert_close(group_advantages(rewards, G, "mean"), rewards - mean_grouped_rewards)  # scale_rewards="none"


def test_clip_by_hand_for_both_signs_of_the_advantage():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 0.5], [1.5, 0.5]]))
    advantages = torch.tensor([1.0, -1.0])  # per sequence, broadcast over its tokens
    loss, stats = grpo_loss(new, old, None, advantages, torch.ones(2, 2), clip=0.2, kl_coef=0.0)
    # A = +1: ratio 1.5 is clipped to 1.2 (-1.2); ratio 0.5 stays (-0.5 beats the clipped -0.8).
    # A = -1: ratio 1.5 stays (1.5 beats 1.2); ratio 0.5 is clipped to 0.8 (0.8 beats 0.5).
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert stats["clipfrac"].item() == pytest.approx(0.5)
    assert stats["ratio"].item() == pytest.approx(1.0)
    assert stats["approxkl"].item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)
    assert "kl" not in stats  # no reference given


def test_clip_high_widens_only_the_upper_bound():
    old = torch.zeros(1, 2)
    new = torch.log(torch.tensor([[1.25, 0.7]]))
    mask = torch.ones(1, 2)
    symmetric, _ = grpo_loss(new, old, None, torch.tensor([1.0]), mask, clip=0.2, kl_coef=0.0)
    assert symmetric.item() == pytest.approx((-1.2 - 0.7) / 2)  # 1.25 clipped to 1.2; 0.7 is the pessimistic side
    higher, stats = grpo_loss(new, old, None, torch.tensor([1.0]), mask, clip=0.2, kl_coef=0.0, clip_high=0.28)
    assert higher.item() == pytest.approx((-1.25 - 0.7) / 2) and stats["clipfrac"].item() == 0.0
    lower, _ = grpo_loss(new, old, None, torch.tensor([-1.0]), mask, clip=0.2, kl_coef=0.0, clip_high=0.28)
    assert lower.item() == pytest.approx((1.25 + 0.8) / 2)  # 0.7 still clipped to 1 - 0.2 = 0.8


def test_token_versus_sequence_normalisation_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # a 3-token and a 1-token response
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.0, 0.0, 0.0], [0.0, 100.0, 100.0]])  # ratio 1 on real tokens; exp(padding) overflows
    advantages = torch.tensor([1.0, -2.0])  # per-token losses: row 0 [-1, -1, -1], row 1 [2]
    token, stats = grpo_loss(new, old, None, advantages, mask, clip=0.2, kl_coef=0.0, normalise="token")
    assert token.item() == pytest.approx((-1 - 1 - 1 + 2) / 4)
    ref = torch.tensor([[0.0, 0.0, 0.0], [0.0, -100.0, -100.0]])  # equal to the policy on real tokens
    penalised, with_ref = grpo_loss(new, old, ref, advantages, mask, clip=0.2, kl_coef=0.5, normalise="token")
    assert penalised.item() == pytest.approx(token.item()) and with_ref["kl"].item() == 0.0
    sequence, _ = grpo_loss(new, old, None, advantages, mask, clip=0.2, kl_coef=0.0, normalise="sequence")
    assert sequence.item() == pytest.approx((-1 + 2) / 2)
    assert stats["ratio"].item() == 1.0 and stats["clipfrac"].item() == 0.0  # padding is not counted
    with pytest.raises(UserError, match="grpo.loss_norm must be token or sequence, not 'seq'"):
        grpo_loss(new, old, None, advantages, mask, clip=0.2, kl_coef=0.0, normalise="seq")


def test_k3_term_value_and_gradient_by_hand():
    new = torch.tensor([[-1.0]], requires_grad=True)
    old, ref, mask = torch.tensor([[-1.0]]), torch.tensor([[-2.0]]), torch.ones(1, 1)
    loss, stats = grpo_loss(new, old, ref, torch.tensor([2.0]), mask, clip=0.2, kl_coef=0.1)
    # k3 = exp(ref - new) - 1 - (ref - new) = e^-1 - 1 + 1; the surrogate at ratio 1 is -A = -2.
    assert stats["kl"].item() == pytest.approx(math.exp(-1.0))
    assert loss.item() == pytest.approx(-2.0 + 0.1 * math.exp(-1.0))
    loss.backward()
    # d/dnew: -A * ratio gives -2; k3 gives 1 - exp(ref - new).
    assert new.grad.item() == pytest.approx(-2.0 + 0.1 * (1.0 - math.exp(-1.0)))
    unpenalised, stats = grpo_loss(new.detach(), old, ref, torch.tensor([2.0]), mask, clip=0.2, kl_coef=0.0)
    assert unpenalised.item() == pytest.approx(-2.0) and stats["kl"].item() == pytest.approx(math.exp(-1.0))
    with pytest.raises(ValueError, match="reference log-probabilities"):
        grpo_loss(new, old, None, torch.tensor([2.0]), mask, clip=0.2, kl_coef=0.1)


def test_token_level_loss_without_kl_is_ppo_policy_loss():
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(4, 5, generator=g) * 3
    new = old + torch.randn(4, 5, generator=g) * 0.3
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2, [1.0] * 1 + [0.0] * 4, [1.0] * 4 + [0.0]])
    advantages = torch.randn(4, generator=g)
    loss, stats = grpo_loss(new, old, None, advantages, mask, clip=0.2, kl_coef=0.0)
    ppo_loss, clipfrac, approxkl = policy_loss(new, old, advantages[:, None].expand(4, 5), mask, clip=0.2)
    torch.testing.assert_close(loss, ppo_loss)
    torch.testing.assert_close(stats["clipfrac"], clipfrac)
    torch.testing.assert_close(stats["approxkl"], approxkl)


def test_kl_in_reward_by_hand():
    scores = torch.tensor([1.0, 0.5])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    logprobs = torch.tensor([[-1.0, -1.0, -1.0], [-1.0, 0.0, 0.0]])
    ref = torch.tensor([[-2.0, -1.0, -3.0], [-1.5, 100.0, 100.0]])  # padding must not count (k3 would overflow there)
    # k1 summed: row 0: 1 + 0 + 2 = 3; row 1: 0.5.
    torch.testing.assert_close(kl_in_reward(scores, logprobs, ref, mask, kl_coef=0.1), torch.tensor([1.0 - 0.3, 0.5 - 0.05]))
    # k3 of log ratio 0.5: e^-0.5 - 1 + 0.5.
    k3 = kl_in_reward(scores, logprobs, ref, mask, kl_coef=1.0, estimator="k3")
    assert k3[1].item() == pytest.approx(0.5 - (math.exp(-0.5) - 0.5))
    with pytest.raises(UserError, match="grpo.kl_estimator must be k1, k2 or k3, not 'k4'"):
        kl_in_reward(scores, logprobs, ref, mask, kl_coef=0.1, estimator="k4")
