"""The arithmetic of PPO, as pure functions on right-padded (B, N) response tensors with a 0/1 mask.

GAE, whitening, the KL estimators and controllers, the clipped policy and value losses, and the
per-token rewards of "The N Implementation Details of RLHF with PPO". GRPO and RLOO reuse the
masked statistics, the KL estimators and the clipped policy loss; each is tested against hand-computed
values in tests/losses/test_ppo_math.py.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.errors import UserError


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, all_reduce=None) -> torch.Tensor:
    """Zero mean (unless shift_mean is False, which keeps the mean) and unit variance over masked entries.

    all_reduce (a sum over DDP ranks) makes the statistics those of every rank's entries together,
    so that N processes whiten exactly as one process with all N batches would.
    """
    total = all_reduce or (lambda t: t)
    count = total(mask.sum()).clamp_min(1)
    mean = total((x * mask).sum()) / count
    var = total((((x - mean) ** 2) * mask).sum()) / count
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over each response; padding contributes nothing.

    values[t] is V(state before token t), rewards[t] the reward for token t. Returns (advantages,
    returns = advantages + values).
    """
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(rewards)
    last = torch.zeros(rewards.size(0), device=rewards.device, dtype=rewards.dtype)
    N = rewards.size(1)
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        last = last * mask[:, t]  # padding positions carry nothing back
        advantages[:, t] = last
    return advantages, advantages + values


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy.

    k1 = log r (unbiased, can be negative), k2 = (log r)^2 / 2, k3 = (r' - 1) - log r' with
    r' = p_ref / p_policy (unbiased and never negative); r = p_policy / p_ref.
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise UserError(f"ppo.kl_estimator must be k1, k2 or k3, not {kind!r}")


def policy_loss(new_logprobs, old_logprobs, advantages, mask, clip: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate; returns (loss, fraction of tokens clipped, approximate KL old->new)."""
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approxkl


def value_loss(new_values, old_values, returns, mask, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: the worse of the plain and the clipped squared error (as in PPO2)."""
    clipped_values = old_values + torch.clamp(new_values - old_values, -clip, clip)
    plain = (new_values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    clipfrac = masked_mean((clipped > plain).float(), mask)
    return loss, clipfrac


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class FixedKLController:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): move the coefficient so the KL tracks a target, proportionally, over a horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        super().__init__(coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + error * n_steps / self.horizon


def assemble_rewards(scores, logprobs, ref_logprobs, mask, kl_coef: float, kl_estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * KL at every token, plus the sequence's score on its last token.

    Returns (rewards, per-token kl).
    """
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1) - 1).clamp_min(0).long()
    rewards = rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))
    return rewards * mask, kl
