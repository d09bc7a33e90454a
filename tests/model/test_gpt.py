"""The GPT backbone and its generation engine: causality, padding, KV cache, sampler, EOS truncation, scalar head, sizes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import REPO
from pipeline.model import GPT, GPTConfig, ScalarGPT, filter_logits, generate, last_token_index, pad_vocab, token_logprobs, truncate_after_eos

VARIANTS = {
    "llama": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu"),
    "gpt2": dict(pos_emb="learned", norm="layernorm", mlp="gelu", bias=True),
    "gqa": dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2),
    "narrow-heads": dict(n_kv_head=2, head_dim=4),  # attention narrower than the residual stream (pruned heads)
}


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=96, block_size=48, n_layer=2, n_head=4, n_embd=32, **kw)).eval()


def left_padded_batch(vocab=96, T=20):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(3, vocab, (3, T), generator=g)
    mask = torch.ones_like(x)
    mask[0, :6] = 0
    mask[1, :2] = 0
    x = x.masked_fill(mask == 0, 0)
    return x, mask


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_later_tokens_do_not_change_earlier_logits(variant):
    model = tiny(**VARIANTS[variant])
    x = torch.randint(0, 96, (2, 16))
    y = x.clone()
    y[:, 10:] = (y[:, 10:] + 1) % 96
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_left_padding_gives_the_unpadded_logits(variant):
    model = tiny(**VARIANTS[variant])
    x, mask = left_padded_batch()
    padded = model(x, attention_mask=mask)
    for row in range(3):
        start = int((mask[row] == 0).sum())
        alone = model(x[row : row + 1, start:])
        torch.testing.assert_close(padded[row, start:], alone[0], rtol=1e-4, atol=1e-5)
    assert torch.isfinite(padded).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_decoding_equals_full_forward_under_left_padding(variant):
    model = tiny(**VARIANTS[variant])
    x, mask = left_padded_batch()
    full = model(x, attention_mask=mask)
    cache = model.new_kv_cache(3, x.size(1))
    steps = [model(x[:, :9], attention_mask=mask[:, :9], kv_cache=cache)]  # prefill
    for t in range(9, x.size(1)):
        steps.append(model(x[:, t : t + 1], attention_mask=mask[:, : t + 1], kv_cache=cache))
    incremental = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], rtol=1e-4, atol=1e-5)


def test_kv_cache_chunked_prefill_without_mask():
    model = tiny()
    x = torch.randint(0, 96, (2, 12))
    cache = model.new_kv_cache(2, 12)
    chunks = torch.cat([model(x[:, :5], kv_cache=cache), model(x[:, 5:], kv_cache=cache)], dim=1)
    torch.testing.assert_close(chunks, model(x), rtol=1e-4, atol=1e-5)


def test_sampled_logprobs_equal_a_full_forward_with_temperature():
    model = tiny()
    x, mask = left_padded_batch(T=10)
    gen = generate(model, x, mask, max_new_tokens=12, temperature=0.7, top_k=20, eos_id=5, pad_id=0, generator=torch.Generator().manual_seed(0))
    seq = torch.cat([x, gen.tokens], dim=1)
    seq_mask = torch.cat([mask, gen.mask], dim=1)
    logits = model(seq, attention_mask=seq_mask)[:, x.size(1) - 1 : -1]
    recomputed = token_logprobs(logits, gen.tokens, temperature=0.7)
    torch.testing.assert_close(recomputed * gen.mask, gen.logprobs, rtol=1e-4, atol=1e-4)
    assert (gen.logprobs <= 0).all()


def test_generation_stops_at_eos_and_pads_after_it():
    model = tiny()
    x = torch.randint(3, 96, (4, 6))
    favour_eos = torch.zeros(96)
    favour_eos[7] = 50.0  # token 7 (our EOS here) becomes certain after the first sampled step
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        return output + favour_eos if len(calls) > 1 else output

    handle = model.lm_head.register_forward_hook(hook)
    gen = generate(model, x, max_new_tokens=10, temperature=1.0, eos_id=7, pad_id=0, generator=torch.Generator().manual_seed(0))
    handle.remove()
    assert gen.tokens.shape == (4, 2)
    assert (gen.tokens[:, 1] == 7).all() and gen.finished.all()
    assert gen.mask.sum() == 8 and gen.lengths.tolist() == [2, 2, 2, 2]


def test_greedy_generation_matches_argmax_of_full_forward():
    model = tiny()
    x = torch.randint(3, 96, (1, 5))
    gen = generate(model, x, max_new_tokens=8, temperature=0.0)
    seq = x
    for _ in range(8):
        nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(gen.tokens, seq[:, 5:])


def test_generation_respects_the_context_limit():
    model = tiny()
    gen = generate(model, torch.randint(3, 96, (1, 40)), max_new_tokens=100, temperature=0.0)
    assert gen.tokens.size(1) == 8  # block_size 48 - prompt 40
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.ones(2, 4, dtype=torch.long), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="block_size=48"):
        model(torch.zeros(1, 49, dtype=torch.long))


def test_truncation_after_eos():
    tokens = torch.tensor([[4, 2, 5, 6], [4, 5, 6, 7]])
    mask = torch.ones_like(tokens)
    out, m = truncate_after_eos(tokens, mask, eos_id=2, pad_id=0)
    assert out.tolist() == [[4, 2, 0, 0], [4, 5, 6, 7]] and m.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2, top_p=None)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=None, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_k=None, top_p=0.4)).tolist() == [[False, True, True, True]]


def test_scalar_head_reads_backbone_and_last_token_index():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=32)
    lm = GPT(config)
    rm = ScalarGPT(config)
    missing, unexpected = rm.load_state_dict(lm.state_dict(), strict=False)
    assert set(missing) == {"score_head.weight", "score_head.bias"} and not unexpected
    x, mask = left_padded_batch(T=10)
    values = rm(x, attention_mask=mask)
    assert values.shape == (3, 10)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(right).tolist() == [2, 4, 0]
    assert last_token_index(mask).tolist() == [9, 9, 9]


def test_training_reduces_loss_on_a_repeated_pattern():
    model = tiny().train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.arange(33).remainder(8).repeat(4, 1) + 3
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_gpt2_small_forward_and_backward_on_cpu():
    """The 124M config is a real GPT-2 small: parameter count and one training step."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(REPO / "conf/model/gpt2.yaml")
    arch = {k: v for k, v in OmegaConf.to_container(cfg).items() if k in GPTConfig.__dataclass_fields__}
    model = GPT(GPTConfig(vocab_size=50257, **arch))
    assert 123e6 < model.num_params() < 126e6  # 124M with GPT-2's vocabulary, embeddings tied
    x = torch.randint(0, 50257, (1, 64))
    loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
    loss.backward()
    assert model.wte.weight.grad is not None and torch.isfinite(loss)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="n_head"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="pos_emb"):
        GPTConfig(pos_emb="alibi")
    with pytest.raises(ValueError, match="unknown keys"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="even head size"):
        GPTConfig(n_embd=32, n_head=2, head_dim=5)
    # head_dim: optional; the derived width is written as None, so old files (no such key) and new ones agree.
    assert GPTConfig(n_embd=30, n_head=4, head_dim=6).attn_width == 24
    assert GPTConfig(n_embd=32, n_head=4, head_dim=8).head_dim is None
    old = GPTConfig().to_dict()
    del old["head_dim"]
    assert GPTConfig.from_dict(old) == GPTConfig()
    assert pad_vocab(2050) == 2112
