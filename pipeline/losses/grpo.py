"""The arithmetic of GRPO and RLOO: group baselines, the clipped per-token loss and its normalisations.

Each prompt gets G sampled responses and one score per response. The advantage of a response is
its score against the other responses to the same prompt, so no value network is needed; it is
broadcast over the response's tokens in PPO's clipped surrogate. Tensors follow ppo.py: right-padded
(B, N) response tensors with a 0/1 mask; sequence-level tensors are (B,), prompt-major (row b*G + g
is sample g of prompt b, as TRL's GRPOTrainer repeats each prompt G times in a row).

Tested against hand-computed values, and `group_norm` against TRL's formula, in tests/losses/test_grpo.py.
"""

from __future__ import annotations

import torch

from pipeline.errors import UserError
from pipeline.losses.ppo import kl_penalty, masked_mean

BASELINES = ("group_norm", "mean", "rloo")
NORMALISATIONS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """rewards (B*G,) as (B, G); ValueError when the rows do not split into whole groups."""
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} samples per prompt")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    return rewards.reshape(-1, group_size)


def _zero_padding(logprobs: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with padding set to 0: exp() of a padding value can overflow, and inf * 0 is NaN."""
    return torch.where(keep, logprobs, torch.zeros_like(logprobs))


def group_advantages(rewards: torch.Tensor, group_size: int, baseline: str, eps: float = 1e-4) -> torch.Tensor:
    """Per-response advantages (B*G,) from scores (B*G,), each against the other samples of its prompt.

    - `group_norm`, GRPO (Shao et al. 2024, DeepSeekMath): (r - group mean) / (group std + eps), with
      the unbiased (Bessel-corrected, G - 1) std, as TRL's GRPOTrainer computes it (`nanstd` in
      trl/trainer/utils.py; eps 1e-4 as there).
    - `mean`, Dr. GRPO (Liu et al. 2025): r - group mean. Not dividing by the std keeps prompts that
      are nearly always solved (or failed) from being weighted up; TRL's `scale_rewards="none"`.
    - `rloo`, RLOO (Ahmadian et al. 2024, after Kool et al. 2019): r - mean of the G - 1 other samples,
      which equals G / (G - 1) * (r - group mean); the baseline does not depend on the sample itself.
    """
    if baseline not in BASELINES:
        raise UserError(f"grpo.baseline must be {', '.join(BASELINES[:-1])} or {BASELINES[-1]}, not {baseline!r}")
    if group_size < 2:
        raise UserError(
            f"grpo.baseline={baseline} compares the samples of one prompt with each other, so it needs at least 2 "
            f"samples per prompt (grpo.group_size), not {group_size}"
        )
    grouped = _grouped(rewards, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    if baseline == "group_norm":
        advantages = (grouped - mean) / (grouped.std(dim=1, keepdim=True) + eps)  # torch's std is unbiased, like TRL's
    elif baseline == "mean":
        advantages = grouped - mean
    else:
        others_mean = (grouped.sum(dim=1, keepdim=True) - grouped) / (group_size - 1)
        advantages = grouped - others_mean
    return advantages.reshape(-1)


def zero_signal_groups(rewards: torch.Tensor, group_size: int) -> int:
    """How many prompts got exactly the same score for every sample: their advantages are all zero.

    Such groups carry no gradient under any baseline above; DAPO (Yu et al. 2025) drops them and
    samples more prompts (dynamic sampling), TRL logs their share as `frac_reward_zero_std`.
    """
    grouped = _grouped(rewards, group_size)
    return int((grouped == grouped[:, :1]).all(dim=1).sum().item())


def grpo_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float,
    kl_coef: float,
    normalise: str = "token",
    clip_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective (DeepSeekMath eq. 3, as TRL's GRPOTrainer computes it) as a loss to minimise.

    Per token: max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip_high)) + kl_coef * k3(policy, ref),
    with A the sequence's advantage (B,) broadcast over its tokens ((B, N) advantages are used as
    given), ratio = exp(new - old), and clip_high = clip unless set (DAPO's asymmetric "clip-higher").
    The k3 term is GRPO's KL in the loss; kl_coef 0 skips it, and ref_logprobs may then be None.

    normalise: `token` sums over every token of the batch and divides by their number (DAPO and
    Dr. GRPO's point: each token weighs the same, so a long wrong answer is not penalised less per
    token; TRL's `bnpo`, and `dapo` within one batch); `sequence` averages each response over its
    tokens, then the responses (the GRPO paper; TRL's `grpo`).

    Returns (loss, stats): clipfrac (share of tokens where the clip is active), approxkl
    (0.5 * mean (log ratio)^2, old -> new, as ppo.policy_loss), ratio (mean), and kl (mean k3 per
    token against the reference) whenever ref_logprobs is given. Stats are detached.
    """
    if normalise not in NORMALISATIONS:
        raise UserError(f"grpo.loss_norm must be token or sequence, not {normalise!r}")
    if kl_coef and ref_logprobs is None:
        raise ValueError("grpo_loss: kl_coef is not 0, so the reference log-probabilities are needed")
    keep = mask.bool()
    mask = mask.to(new_logprobs.dtype)
    new_logprobs, old_logprobs = _zero_padding(new_logprobs, keep), _zero_padding(old_logprobs, keep)
    if ref_logprobs is not None:
        ref_logprobs = _zero_padding(ref_logprobs, keep)
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    high = clip if clip_high is None else clip_high
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped)
    kl = kl_penalty(new_logprobs, ref_logprobs, "k3") if ref_logprobs is not None else None
    if kl_coef:
        per_token = per_token + kl_coef * kl
    if normalise == "token":
        loss = masked_mean(per_token, mask)
    else:
        loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(mask.dtype), mask),
            "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
        if kl is not None:
            stats["kl"] = masked_mean(kl, mask)
    return loss, stats


def kl_in_reward(
    scores: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float,
    estimator: str = "k1",
) -> torch.Tensor:
    """Scores (B,) minus kl_coef times each response's KL to the reference, summed over its tokens.

    The `grpo.kl_in=reward` option: PPO (Ziegler et al. 2019; InstructGPT) subtracts the KL from the
    reward at every token; GRPO's advantage is one number per response, so the per-token KL is summed
    to one number per response before the group baseline is taken. TRL's RLOOTrainer does the same
    (`rewards - beta * sum(k1)`, with k1 from the sampling policy's log-probabilities, following the
    RLOO paper): pass the rollout-time log-probabilities as `logprobs`, since the reward is fixed per rollout.
    """
    if estimator not in KL_ESTIMATORS:
        raise UserError(f"grpo.kl_estimator must be k1, k2 or k3, not {estimator!r}")
    keep = mask.bool()
    kl = (kl_penalty(_zero_padding(logprobs, keep), _zero_padding(ref_logprobs, keep), estimator) * mask).sum(dim=1)
    return scores - kl_coef * kl.to(scores.dtype)
