"""Next-token prediction: the loss of pretraining and of instruction finetuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # the label of a token that carries no loss (a prompt token in SFT, padding)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against targets (B, T), in float32; IGNORE targets count for nothing.

    The caller aligns them: logits of positions [:-1] against the tokens (or labels) of positions [1:].
    """
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
