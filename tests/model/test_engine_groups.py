"""generate(num_samples=G): one prefill per prompt, G continuations each, prompt-major rows (GRPO's groups)."""

from __future__ import annotations

import pytest
import torch

from pipeline.model import GPT, GPTConfig, generate, left_pad, token_logprobs

G = 3


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, block_size=40, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


def prompts():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 64, (n,), generator=g).tolist() for n in (4, 9, 6)]  # different lengths: left padding


def step_logits(model: GPT, ids, mask, **kw) -> tuple[list[torch.Tensor], object]:
    """The logits of the last position at every call of the model during one generate()."""
    seen = []
    handle = model.lm_head.register_forward_hook(lambda module, inputs, output: seen.append(output[:, -1].detach().clone()))
    try:
        gen = generate(model, ids, mask, **kw)
    finally:
        handle.remove()
    return seen, gen


@pytest.mark.parametrize("variant", [{}, {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}, {"n_kv_head": 2}])
def test_shared_prefill_gives_the_logits_of_separate_prefills_at_every_step(variant):
    model = tiny(**variant)
    ids, mask = left_pad(prompts(), 0)
    shared, grouped = step_logits(model, ids, mask, max_new_tokens=8, temperature=0.0, num_samples=G)
    separate, repeated = step_logits(model, ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0), max_new_tokens=8, temperature=0.0)
    assert len(shared) == len(separate) == 8
    torch.testing.assert_close(shared[0].repeat_interleave(G, 0), separate[0], rtol=1e-5, atol=1e-5)  # one prefill row per prompt
    for a, b in zip(shared[1:], separate[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert torch.equal(grouped.tokens, repeated.tokens) and torch.equal(grouped.mask, repeated.mask)


def test_rows_are_prompt_major():
    """Row b*G+g belongs to prompt b: greedy, every row of a group is that prompt's own greedy answer."""
    model = tiny()
    ps = prompts()
    ids, mask = left_pad(ps, 0)
    gen = generate(model, ids, mask, max_new_tokens=6, temperature=0.0, num_samples=G)
    assert gen.tokens.shape[0] == gen.logprobs.shape[0] == gen.mask.shape[0] == gen.finished.shape[0] == len(ps) * G
    for b, p in enumerate(ps):
        alone = generate(model, torch.tensor([p]), max_new_tokens=6, temperature=0.0)
        for g in range(G):
            assert gen.tokens[b * G + g, : alone.tokens.size(1)].tolist() == alone.tokens[0].tolist(), (b, g)


def test_sampled_group_logprobs_equal_a_full_forward():
    model = tiny()
    ids, mask = left_pad(prompts(), 0)
    gen = generate(model, ids, mask, max_new_tokens=10, temperature=0.8, eos_id=5, pad_id=0, generator=torch.Generator().manual_seed(0), num_samples=4)
    rows_ids, rows_mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    seq, seq_mask = torch.cat([rows_ids, gen.tokens], 1), torch.cat([rows_mask, gen.mask], 1)
    logits = model(seq, attention_mask=seq_mask)[:, ids.size(1) - 1 : -1]
    torch.testing.assert_close(token_logprobs(logits, gen.tokens, 0.8) * gen.mask, gen.logprobs, rtol=1e-5, atol=1e-5)
    groups = gen.tokens.view(3, 4, -1)
    assert all(len({tuple(r.tolist()) for r in group}) > 1 for group in groups)  # samples, not copies of one


def test_num_samples_below_one_is_refused():
    with pytest.raises(ValueError, match="num_samples=0"):
        generate(tiny(), torch.tensor([[3, 4]]), max_new_tokens=2, num_samples=0)
