"""Continuous batching in the engine: sequences that join and leave a running DecodeBatch compute what they would alone."""

from __future__ import annotations

import random

import pytest
import torch

from pipeline.model import GPT, GPTConfig, filter_logits, generate
from pipeline.model.engine import DecodeBatch, Sampling, sample_rows


def decisive(block_size: int = 64, **arch) -> GPT:
    """A random model whose argmax is never a near tie (see tests/serving/test_server.py)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**dict(vocab_size=256, block_size=block_size, n_layer=2, n_head=4, n_embd=64, tie_embeddings=False), **arch})).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    return model


def run_staggered(model: GPT, requests: list[tuple[list[int], int]], join_every: int, seed: int = 0) -> dict[int, list[int]]:
    """Greedy answers to requests that join the batch a few at a time, every join_every steps, and leave when done."""
    rng = random.Random(seed)
    batch, pending, got, step = DecodeBatch(model), list(range(len(requests))), {i: [] for i in range(len(requests))}, 0
    while pending or len(batch):
        if pending and (step % join_every == 0 or not len(batch)):
            n = rng.randint(1, 3)
            take, pending = pending[:n], pending[n:]
            batch.join([requests[i][0] for i in take], take)
        tokens = sample_rows(batch.logits, [Sampling(0.0)] * len(batch))
        kept = []
        for row, token in zip(batch.rows, tokens.tolist()):
            got[row].append(token)
            kept.append(len(got[row]) < requests[row][1])
        order = batch.keep(kept)
        if len(batch):
            batch.step(tokens[order])
        assert batch.width <= model.config.block_size
        step += 1
    return got


@pytest.mark.parametrize("arch", [{}, dict(pos_emb="learned", norm="layernorm", mlp="gelu"), dict(n_kv_head=2)])
def test_joining_and_leaving_rows_answer_as_alone(arch):
    model = decisive(**arch)
    rng = random.Random(1)
    requests = [([rng.randrange(256) for _ in range(rng.randint(1, 40))], rng.randint(1, 23)) for _ in range(24)]
    alone = [generate(model, torch.tensor([p]), max_new_tokens=n, temperature=0).tokens[0].tolist() for p, n in requests]
    for join_every in (1, 4):
        got = run_staggered(model, requests, join_every)
        assert [got[i] for i in range(len(requests))] == alone


def test_the_time_axis_never_outgrows_the_context():
    """Long-lived rows next to a stream of short ones: the columns no row uses are cut off, so width <= block_size."""
    model = decisive(block_size=32)
    requests = [([1, 2, 3], 28)] + [([5] * 20, 8) for _ in range(12)]
    got = run_staggered(model, requests, join_every=2)
    assert len(got[0]) == 28 and all(len(got[i]) == 8 for i in range(1, 13))


def test_n_copies_share_one_prefill_and_prompt_logits_are_returned():
    model = decisive()
    batch = DecodeBatch(model)
    scored = batch.join([[3, 4, 5], [7, 8]], ["a0", "a1", "a2", "b0"], copies=[3, 1], scored=[False, True])
    assert batch.rows == ["a0", "a1", "a2", "b0"] and batch.logits.shape == (4, 256)
    assert torch.equal(batch.logits[0], batch.logits[2]) and scored[0] is None
    with torch.no_grad():
        own = model(torch.tensor([[7, 8]]))[0]
    assert torch.allclose(scored[1], own, atol=1e-5)


def test_sample_rows_settings_per_row_and_seeds_of_their_own():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    # greedy row, top_k=1 row and a tiny-nucleus row all take the argmax, whatever the temperature
    out = sample_rows(logits, [Sampling(0.0), Sampling(5.0, top_k=1), Sampling(5.0, top_p=0.01), Sampling(0.0)])
    assert out.tolist() == [0, 0, 0, 0]
    # a row with its own generator draws the same alone as beside others
    def seeded(n_rows):
        g = torch.Generator().manual_seed(3)
        settings = [Sampling(1.0) for _ in range(n_rows - 1)] + [Sampling(1.0, generator=g)]
        return [sample_rows(torch.zeros(n_rows, 50), settings, torch.Generator().manual_seed(n_rows))[-1].item() for _ in range(5)]

    assert seeded(1) == seeded(6)
    # per-row filters equal the scalar ones row by row
    x = torch.randn(3, 10)
    per_row = filter_logits(x, torch.tensor([2, 0, 5]), torch.tensor([1.0, 0.5, 0.9]))
    for i, (k, p) in enumerate([(2, None), (None, 0.5), (5, 0.9)]):
        assert torch.equal(per_row[i], filter_logits(x[i : i + 1], k, p)[0])
