"""Next-token loss by hand, and our log-prob / entropy helpers against TRL's (we keep ours: see the note in test names)."""

from __future__ import annotations

import math

import torch

from pipeline.losses.lm import IGNORE, next_token_loss
from pipeline.losses.ppo import entropy_from_logits
from pipeline.model import token_logprobs


def test_next_token_loss_is_the_mean_negative_log_probability_of_the_targets():
    # Two positions over a 2-token vocabulary: p(target) = softmax([0, ln 3]) -> 3/4 at the first, 1/2 at the second.
    logits = torch.tensor([[[0.0, math.log(3.0)], [1.0, 1.0]]])
    targets = torch.tensor([[1, 0]])
    expected = -(math.log(0.75) + math.log(0.5)) / 2
    assert math.isclose(next_token_loss(logits, targets).item(), expected, rel_tol=1e-6)


def test_ignored_targets_carry_no_loss_and_do_not_count_in_the_mean():
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0]]])
    only_first = next_token_loss(logits, torch.tensor([[1, IGNORE]]))
    assert math.isclose(only_first.item(), -math.log(0.75), rel_tol=1e-6)


def test_low_precision_logits_are_scored_in_float32():
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 11, (2, 3), generator=torch.Generator().manual_seed(1))
    loss = next_token_loss(logits.bfloat16(), targets)
    assert loss.dtype == torch.float32
    assert torch.allclose(loss, next_token_loss(logits.bfloat16().float(), targets))


def test_our_token_logprobs_and_entropy_equal_trls_helpers():
    """TRL's selective_log_softmax and entropy_from_logits compute the same numbers in float32.

    Ours stay because importing trl.trainer.utils costs each stage process several seconds of start-up
    (transformers and TRL's trainers come with it) for two short functions.
    """
    from trl.trainer.utils import entropy_from_logits as trl_entropy
    from trl.trainer.utils import selective_log_softmax

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g) * 3
    tokens = torch.randint(0, 17, (3, 5), generator=g)
    for temperature in (1.0, 0.7):
        ours = token_logprobs(logits, tokens, temperature)
        theirs = selective_log_softmax(logits, tokens, temperature=temperature)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(entropy_from_logits(logits), trl_entropy(logits), rtol=0, atol=1e-6)


def test_sft_loss_over_the_kept_positions_only_equals_the_loss_over_all_logits():
    """LanguageModelModule runs the output head only where a label is not IGNORE (prompt and padding carry none):
    the loss and every gradient are those of the full (B, T, V) logits with IGNORE targets."""
    from pipeline.training import LanguageModelModule

    config = {"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 2, "n_embd": 32}
    module = LanguageModelModule(model_config=config, optim={}, max_steps=1, stage="sft")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 13), generator=g)
    labels = ids.clone()
    labels[:, :6] = IGNORE  # prompts
    labels[2, 9:] = IGNORE  # padding
    kept = module.loss({"input_ids": ids, "labels": labels})
    kept.backward()
    kept_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    full = next_token_loss(module.model(ids[:, :-1]), labels[:, 1:])
    full.backward()
    torch.testing.assert_close(kept, full)
    for a, p in zip(kept_grads, module.parameters()):
        torch.testing.assert_close(a, p.grad)
    assert module.model(ids[:, :-1], keep=labels[:, 1:] != IGNORE).shape == ((labels[:, 1:] != IGNORE).sum().item(), 64)
