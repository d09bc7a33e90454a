"""Knowledge distillation: divergences between a student's and a teacher's next-token distributions.

Every function takes the logits (B, T, V) of both models at the same positions (those that predict
answer tokens) and a mask (B, T), 1 on the tokens that count. S is the student's distribution at a
position, T the teacher's; the generalised Jensen-Shannon divergence of GKD (Agarwal et al., 2024,
"On-Policy Distillation of Language Models", eq. 1) interpolates between the two KLs:

    beta = 0        forward KL(T || S) = sum_v T_v (log T_v - log S_v)        mass-covering: the classic KD
    beta = 1        reverse KL(S || T)                                        mode-seeking
    0 < beta < 1    JSD_beta = beta KL(T || M) + (1 - beta) KL(S || M),  M = beta T + (1 - beta) S

(TRL's GKDTrainer.generalized_jsd_loss has the same meaning of beta.) JSD_beta tends to 0 at both
ends, as beta KL(T || S) near 0 and (1 - beta) KL(S || T) near 1, which is why the ends are the two
KLs themselves rather than the limit. M is formed in log space (logsumexp), so no probability
underflows on the way.

`temperature` divides both models' logits before the softmax. The loss is not multiplied by
temperature^2 (Hinton et al.'s factor, which keeps the soft-label gradients as large as the hard-label
ones when both are mixed at T > 1): GKD and TRL leave it out, and so do we; at the default temperature
of 1 the two agree. The per-token divergences are averaged over the masked tokens of the batch: every
answer token weighs the same.
"""

from __future__ import annotations

import math

import torch


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last dimension from log-probabilities (..., V) -> (...); a token p gives no mass counts for nothing."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """The generalised JSD (module docstring) of every position: logits (B, T, V) -> (B, T), in float32."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta}: must be in [0, 1] (0 forward KL, 1 reverse KL)")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be > 0")
    log_s = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if beta == 0.0:
        return _kl(log_t, log_s)
    if beta == 1.0:
        return _kl(log_s, log_t)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log1p(-beta)]), dim=0)
    return beta * _kl(log_t, log_m) + (1.0 - beta) * _kl(log_s, log_m)


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """The generalised JSD averaged over the masked tokens of the batch (a scalar; 0 where nothing is masked in)."""
    per_token = token_divergence(student_logits, teacher_logits, beta, temperature)
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def sequence_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(p || q) of each sequence in nats (B,): the exact per-token KLs over the vocabulary, summed over its masked tokens.

    Along responses sampled from p this is the Rao-Blackwellised estimate of the sequence-level KL
    between the two models: unbiased like the summed log-ratio of the sampled tokens, never negative,
    and of lower variance (each token's whole distribution counts, not the one token drawn).
    """
    log_p = torch.log_softmax(p_logits.float() / temperature, dim=-1)
    log_q = torch.log_softmax(q_logits.float() / temperature, dim=-1)
    return (_kl(log_p, log_q) * mask.to(log_p.dtype)).sum(-1)
