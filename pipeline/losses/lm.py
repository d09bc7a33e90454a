"""Next-token prediction: the loss of pretraining and of instruction finetuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a token that carries no loss (a prompt token in SFT, padding)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (..., V) against targets (...), in float32; IGNORE targets count for nothing.

    The caller aligns them: logits of positions [:-1] against the tokens (or labels) of positions [1:]
    ((B, T, V) against (B, T)), or the logits of the positions that carry a loss against their labels ((N, V), (N,)).
    """
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE)
