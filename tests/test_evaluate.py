"""The sampled KL of a policy to a reference: the drawn tokens' log-ratio and the exact per-position KL estimate the same thing."""

from __future__ import annotations

import torch

from helpers import tiny_model
from pipeline.evaluate import sampled_kl


def test_exact_and_log_ratio_estimates_agree_and_the_exact_one_is_never_negative():
    policy, reference = tiny_model(seed=1, vocab_size=64, block_size=32), tiny_model(seed=2, vocab_size=64, block_size=32)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]] * 200
    common = dict(max_new_tokens=6, temperature=1.0, eos_id=2, pad_id=0, seed=7, batch_size=200)
    ratio = sampled_kl(policy, reference, prompts, **common)
    exact = sampled_kl(policy, reference, prompts, exact=True, **common)
    assert (exact >= 0).all() and (ratio < 0).any()  # a drawn token's log-ratio can be negative; a KL cannot
    # The same expectation (the same samples: one seed), the exact one with less spread.
    assert abs(exact.mean().item() - ratio.mean().item()) < 0.1 * exact.mean().item()
    assert exact.std().item() < ratio.std().item()
    assert sampled_kl(policy, policy, prompts[:6], exact=True, **common).abs().max().item() < 1e-5
