"""The one generation path: left-padded batches, KV-cache sampling and the log-probs of chosen tokens.

Generate, the SFT and PPO evaluations, PPO's rollouts and the report all sample through `generate`;
it knows token ids only (no tokenizer), so a server or a new RL stage reuses it as it is; GRPO
draws its groups with `num_samples` (one prefill per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.model.gpt import GPT


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every row ends on a real token."""
    rows = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    return ids.to(device), mask.to(device)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature); logits (B, T, V), tokens (B, T) -> (B, T).

    Computed in float32 with logsumexp rather than a full log_softmax so that no (B, T, V) tensor of
    log-probabilities is materialised.
    """
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(model: GPT, batch: dict, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the scored tokens of a `data.collators.pack_sequences` batch, and their sum per sequence.

    One forward over the batch (packed rows read each shared prompt once); returns the per-token
    log-probs (n_targets,), aligned with batch["target_seq"], and the sums (N,), one per sequence.
    """
    if "packed_mask" in batch:
        logits = model(batch["input_ids"], packed=(batch["positions"], batch["packed_mask"]))
    else:
        logits = model(batch["input_ids"])  # right padding: causal attention needs no mask
    # index_select, not [index]: a shared prompt's last position predicts every answer's first token, and the
    # backward of advanced indexing with repeated indices sums in a thread-dependent order (no exact resume).
    picked = logits.flatten(0, 1).index_select(0, batch["target_index"])  # (n_targets, V)
    per_token = token_logprobs(picked[None], batch["target_ids"][None], temperature)[0]
    sums = per_token.new_zeros(batch["score_index"].numel()).index_add(0, batch["target_seq"], per_token)
    return per_token, sums


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, N) generated ids, pad after the stop token
    logprobs: torch.Tensor  # (B, N) log-prob of each under softmax(logits / temperature); 0 on padding
    mask: torch.Tensor  # (B, N) 1 up to and including the stop token
    finished: torch.Tensor  # (B,) True where the response ended with the stop token

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf. logits (B, V)."""
    if top_k is not None and 0 < top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0.0 < top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
@torch.compiler.set_stance("force_eager")  # a compiled model (model.compile=true) samples eagerly: see the docstring
def generate(
    model: GPT,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    num_samples: int = 1,
) -> Generation:
    """Sample continuations of a batch of left-padded prompts with a KV cache.

    input_ids (B, T) are prompts padded on the LEFT (so every row's last column is a real token);
    attention_mask (B, T) marks real tokens. temperature 0 is greedy. Rows stop at eos_id, which is
    kept as the last real token; later positions hold pad_id. The returned log-probs are under the
    temperature-scaled full distribution (before top-k/top-p), the quantity PPO recomputes.

    num_samples G > 1 draws G continuations of every prompt (GRPO's groups): the prompts are
    prefilled once, then the cache and the last logits are copied to B*G rows, prompt-major (row
    b*G+g is sample g of prompt b), and every returned tensor has B*G rows.

    A model compiled in place (model.compile=true) runs eagerly here: the prefill and every decode step
    would be graphs of their own, recompiled for each new batch and prompt width, while the training
    forwards that compile pays for are elsewhere. Under autocast the KV cache holds the autocast dtype.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1")
    B, T = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("generate() needs left-padded prompts: the last column must be a real token in every row")
    max_new_tokens = min(max_new_tokens, model.config.block_size - T)
    if max_new_tokens <= 0:
        raise ValueError(f"prompt of {T} tokens leaves no room to generate within block_size={model.config.block_size}")
    was_training = model.training
    model.eval()
    cache = model.new_kv_cache(B, T + max_new_tokens)
    mask = torch.cat([attention_mask, attention_mask.new_zeros(B, max_new_tokens)], dim=1)  # (B, T+N)
    logits = model(input_ids, attention_mask=mask[:, :T], kv_cache=cache)[:, -1]  # prefill: (B, V)
    if num_samples > 1:  # the samples of a prompt share its prefill; they differ from the first sampled token on
        cache.repeat_interleave(num_samples)
        logits, mask = logits.repeat_interleave(num_samples, dim=0), mask.repeat_interleave(num_samples, dim=0)
        B = B * num_samples
    tokens = input_ids.new_full((B, max_new_tokens), pad_id)
    logprobs = torch.zeros(B, max_new_tokens, device=device)
    alive = torch.ones(B, dtype=torch.bool, device=device)
    steps = 0
    for i in range(max_new_tokens):
        logits = logits.float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
            step_logprobs = torch.log_softmax(logits, dim=-1)
        else:
            scaled = logits / temperature
            step_logprobs = torch.log_softmax(scaled, dim=-1)
            probs = filter_logits(scaled, top_k, top_p).softmax(dim=-1)
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        next_token = torch.where(alive, next_token, pad_id)
        tokens[:, i] = next_token
        logprobs[:, i] = torch.where(alive, step_logprobs.gather(-1, next_token[:, None]).squeeze(-1), 0.0)
        mask[:, T + i] = alive.to(mask.dtype)
        steps = i + 1
        if eos_id is not None:
            alive = alive & (next_token != eos_id)
            if not bool(alive.any()):
                break
        if i + 1 < max_new_tokens:
            logits = model(next_token[:, None], attention_mask=mask[:, : T + i + 1], kv_cache=cache)[:, -1]
    model.train(was_training)
    response_mask = mask[:, T : T + steps]
    finished = (tokens[:, :steps] == eos_id).any(dim=1) if eos_id is not None else torch.zeros(B, dtype=torch.bool, device=device)
    return Generation(tokens[:, :steps], logprobs[:, :steps], response_mask, finished)


def truncate_after_eos(tokens: torch.Tensor, mask: torch.Tensor, eos_id: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each response up to and including its first EOS; pad the rest (the sampler already does this)."""
    is_eos = tokens == eos_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    keep = mask.bool() & ~after
    return torch.where(keep, tokens, pad_id), keep.long()
