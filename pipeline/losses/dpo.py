"""Direct Preference Optimisation: the loss on summed log-probabilities of chosen and rejected answers.

Every function takes per-sequence sums of the answer tokens' log-probabilities (the prompt is not
scored) under the policy and under the frozen reference, one entry per pair: (B,) each.

    h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r))      the implicit reward margin / beta
    sigmoid (DPO, Rafailov et al.):  -log sigmoid(beta h)
        with label_smoothing eps (cDPO, Mitchell 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    ipo (Azar et al.):  (h_avg - 1 / (2 beta))^2, h_avg on log-ratios averaged per answer token

IPO follows TRL's DPOTrainer (trl 1.x `_compute_loss`, loss_type="ipo"): each answer's log-ratio is
divided by its number of answer tokens before the difference is taken (the IPO authors' normalised
form), so the token counts are arguments. TRL's "sigmoid" has no label smoothing (TRL keeps it for
its "robust" and "exo_pair" losses); ours with label_smoothing=0 is TRL's "sigmoid" exactly, and
with label_smoothing > 0 it is the conservative DPO of older TRL releases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.errors import UserError

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss per pair (B,), chosen rewards (B,), rejected rewards (B,)); rewards = beta * (policy - ref), detached.

    chosen_tokens / rejected_tokens (B,): the answers' token counts, needed by loss_type="ipo" only.
    """
    chosen_logratio = policy_chosen - ref_chosen
    rejected_logratio = policy_rejected - ref_rejected
    if loss_type == "sigmoid":
        logits = beta * (chosen_logratio - rejected_logratio)
        loss = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo_loss(loss_type='ipo') needs chosen_tokens and rejected_tokens: IPO averages log-ratios per token")
        h = chosen_logratio / chosen_tokens.clamp_min(1) - rejected_logratio / rejected_tokens.clamp_min(1)
        loss = (h - 1 / (2 * beta)) ** 2
    else:
        raise UserError(f"dpo.loss_type={loss_type}: must be one of {', '.join(LOSS_TYPES)}")
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def chosen_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """The negative log-likelihood of the chosen answers per answer token, over all pairs (RPO's extra term; TRL's "sft").

    chosen_logps (B,) summed log-probs of each pair's chosen answer, chosen_tokens (B,) its token count.
    """
    return -chosen_logps.sum() / chosen_tokens.sum().clamp_min(1)
