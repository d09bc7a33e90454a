"""The one generation path: left-padded batches, KV-cache sampling and the log-probs of chosen tokens.

Generate, the SFT and PPO evaluations, PPO's rollouts and the report all sample through `generate`;
it knows token ids only (no tokenizer), so a server or a new RL stage reuses it as it is; GRPO
draws its groups with `num_samples` (one prefill per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from pipeline.model.gpt import GPT, KVCache


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


def filter_logits(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Set logits outside the top-k and outside the smallest top-p nucleus to -inf. logits (B, V).

    top_k and top_p are one setting for every row (an int / a float, None for none) or one per row
    (tensors (B,), the server's requests each with their own: 0 and 1.0 mean no filtering there).
    """
    V = logits.size(-1)
    if isinstance(top_k, torch.Tensor):
        k = torch.where((top_k > 0) & (top_k < V), top_k, V).to(logits.device)
        if bool((k < V).any()):
            kth = torch.sort(logits, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])
            logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_k is not None and 0 < top_k < V:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    per_row = isinstance(top_p, torch.Tensor)
    if (per_row and bool((top_p < 1.0).any())) or (not per_row and top_p is not None and 0.0 < top_p < 1.0):
        p = top_p.to(logits.device, logits.dtype)[:, None] if per_row else top_p
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= p
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


# ---------------------------------------------------------------------------------------------------
# Continuous batching: the server's path (pipeline/serving/scheduler.py). Same model, same cache, same
# sampling rules as `generate`, but sequences join and leave a running batch at token boundaries.


@dataclass
class Sampling:
    """One sequence's sampling settings: temperature 0 is greedy; top_k 0 and top_p 1.0 filter nothing.

    A sequence with its own generator (a request's seed) draws only from it, so its sample does not
    depend on which other sequences share the batch; the others share the batch's generator.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None


def sample_rows(logits: torch.Tensor, settings: Sequence[Sampling], generator: torch.Generator | None = None) -> torch.Tensor:
    """One next token (B,) for every row of logits (B, V), each under its own Sampling."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    sampled_rows = [i for i, s in enumerate(settings) if s.temperature > 0]
    if not sampled_rows:
        return greedy
    index = torch.tensor(sampled_rows, device=logits.device)
    chosen = [settings[i] for i in sampled_rows]
    temperature = torch.tensor([s.temperature for s in chosen], device=logits.device)[:, None]
    top_k = torch.tensor([s.top_k for s in chosen], device=logits.device)
    top_p = torch.tensor([s.top_p for s in chosen], device=logits.device)
    probs = filter_logits(logits.index_select(0, index) / temperature, top_k, top_p).softmax(dim=-1)
    out = greedy.clone()
    shared = [j for j, s in enumerate(chosen) if s.generator is None]
    if shared:
        rows = torch.tensor(shared, device=logits.device)
        out[index[rows]] = torch.multinomial(probs.index_select(0, rows), 1, generator=generator).squeeze(-1)
    for j, s in enumerate(chosen):  # rows with a seed of their own, one draw each from their own stream
        if s.generator is not None:
            out[sampled_rows[j]] = torch.multinomial(probs[j : j + 1], 1, generator=s.generator)[0, 0]
    return out


class DecodeBatch:
    """Sequences decoded together, joining and leaving between tokens (continuous batching).

    All rows share one KV cache whose time axis is the batch's: a row occupies the columns from its
    prompt's first token to the newest one, padding (mask 0) before that. A joining prompt is
    prefilled on its own (with the others joining at that step) and placed so that it ends on the
    newest column; the mask gives each row the positions of its own tokens (positions_from_mask),
    so a row computes what it would compute alone, up to float rounding of the wider batch.

    The cache is a store of row slots, and only its first len(rows) slots are live: a joining row
    takes the next free slot, a leaving row's slot goes to the last live row (which moves; nothing
    else is copied), and the time axis holds only the columns in use, growing GROW columns at a
    time and cut back to the longest live row when it fills (at most block_size columns when every
    row's prompt + new tokens fit in it). Copying the whole cache on every join and leave would
    cost more than decoding when answers are short.

    `logits` (B, V) holds every row's next-token logits: from its prefill after `join`, from the last
    token after `step`. Row order is the order of `rows`, the caller's objects; `keep` says how it changed.
    """

    GROW = 32  # columns (and at least 8 slots) the store gains when it fills: reallocations stay rare

    def __init__(self, model: GPT, capacity: int | None = None):
        self.model = model
        self.capacity = capacity or model.config.block_size  # the most columns the time axis may ever hold
        self.rows: list = []
        self.cache: KVCache | None = None  # views of the live slots of the store below
        self._k: torch.Tensor | None = None  # (L, slots, nkv, columns, hs)
        self._v: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None  # (B, width) 1 on real tokens
        self.logits: torch.Tensor | None = None  # (B, V)

    @property
    def width(self) -> int:
        return self.cache.pos if self.cache is not None else 0

    def __len__(self) -> int:
        return len(self.rows)

    def _view(self) -> None:
        """Point the cache at the live slots (views: what the model writes lands in the store)."""
        self.cache.k, self.cache.v = self._k[:, : len(self.rows)], self._v[:, : len(self.rows)]

    def _store(self, slots: int, columns: int) -> None:
        """(Re)allocate the store with at least `slots` slots and `columns` columns, keeping the live rows' cache."""
        old_k, old_v = self._k, self._v
        have_slots, have_columns = (old_k.size(1), old_k.size(3)) if old_k is not None else (0, 0)
        if slots <= have_slots and columns <= have_columns:
            return
        slots = max(slots, have_slots, 8) if slots <= have_slots else max(2 * have_slots, slots, 8)
        columns = max(columns, have_columns) if columns <= have_columns else min(self.capacity, self.GROW * -(-(columns + self.GROW // 2) // self.GROW))
        c = self.model.config
        like = self.model.new_kv_cache(1, 1).k
        shape = (c.n_layer, slots, c.n_kv_head, columns, c.head_size)
        self._k, self._v = like.new_zeros(shape), like.new_zeros(shape)
        if old_k is not None and self.rows:
            B, W = len(self.rows), self.width
            self._k[:, :B, :, :W], self._v[:, :B, :, :W] = old_k[:, :B, :, :W], old_v[:, :B, :, :W]

    @torch.inference_mode()
    def join(self, prompts: Sequence[Sequence[int]], rows: Sequence, copies: Sequence[int] | None = None, scored: Sequence[bool] | None = None) -> list[torch.Tensor | None]:
        """Prefill prompts together and add them to the batch: prompt i as copies[i] rows (its n samples share one prefill).

        rows are the caller's objects for the new rows (sum(copies) of them, prompt-major), added at
        the end. Returns, for each prompt with scored[i], the logits (T_i, V) at each of its positions
        (a prompt's own log-probs: the completions endpoint's echo), else None. Nothing changes if the
        prefill fails. The model must be in eval mode.
        """
        copies = list(copies or [1] * len(prompts))
        if len(rows) != sum(copies):
            raise ValueError(f"join: {len(rows)} rows for {sum(copies)} sequences")
        longest = max(len(p) for p in prompts)
        if longest >= self.capacity:
            raise ValueError(f"a prompt of {longest} tokens leaves no room within the context of {self.capacity}")
        model = self.model
        device = model.wte.weight.device
        ids, mask = left_pad(prompts, 0, device)
        n, T = ids.shape
        small = model.new_kv_cache(n, T)
        hidden = model.hidden_states(ids, attention_mask=mask, kv_cache=small)  # (n, T, C)
        logits = model.lm_head(hidden[:, -1])  # (n, V)
        scored_logits = [model.lm_head(hidden[i, T - len(p) :]) if scored and scored[i] else None for i, p in enumerate(prompts)]
        if any(c != 1 for c in copies):
            repeat = torch.tensor(copies, device=device)
            small.k, small.v = small.k.repeat_interleave(repeat, dim=1), small.v.repeat_interleave(repeat, dim=1)
            mask, logits = mask.repeat_interleave(repeat, dim=0), logits.repeat_interleave(repeat, dim=0)
        if not self.rows:  # an empty batch starts over: its axis is this prompt's
            self.cache = KVCache.__new__(KVCache)
            self.cache.pos = 0
            self._store(len(rows), T + 1)
            self._k[:, : len(rows), :, :T], self._v[:, : len(rows), :, :T] = small.k, small.v
            self.cache.pos = T
            self.rows, self.mask, self.logits = list(rows), mask, logits
            self._view()
            return scored_logits
        self.compact()
        if T > self.width:  # the new prompt is longer than the batch's axis: shift the live rows right
            self._make_room(T - self.width)
        B, W, added = len(self.rows), self.width, len(rows)
        self._store(B + added, W + 1)
        for store, new in ((self._k, small.k), (self._v, small.v)):
            store[:, B : B + added, :, : W - T] = 0
            store[:, B : B + added, :, W - T : W] = new
        new_mask = mask.new_zeros(added, W)
        new_mask[:, W - T :] = mask
        self.mask = torch.cat([self.mask, new_mask], dim=0)
        self.logits = torch.cat([self.logits, logits], dim=0)
        self.rows.extend(rows)
        self._view()
        return scored_logits

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> None:
        """Feed each row its next token (B,), in the order of `rows`; `logits` becomes the logits after it."""
        if self.width + 1 > self._k.size(3):
            self.compact()
        if self.width + 1 > self.capacity:
            raise ValueError(f"a sequence outgrew the context of {self.capacity} tokens")
        self._store(len(self.rows), self.width + 1)
        self._view()
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        self.logits = self.model(tokens[:, None].to(self.mask.device), attention_mask=self.mask, kv_cache=self.cache)[:, -1]

    @torch.inference_mode()
    def keep(self, kept: Sequence[bool]) -> torch.Tensor:
        """Drop the rows whose entry is False (finished, cancelled or failed).

        Returns the old index of each row now in the batch, in its new order (the last live rows move
        into the freed slots): index the old rows' next tokens with it before `step`.
        """
        B = len(self.rows)
        live = [i for i, k in enumerate(kept) if k]
        if len(live) == B:
            return torch.arange(B)
        if not live:
            self.rows, self.cache, self.mask, self.logits = [], None, None, None
            return torch.zeros(0, dtype=torch.long)
        n = len(live)
        holes = [i for i in range(n) if not kept[i]]  # freed slots among the first n
        movers = [i for i in live if i >= n]  # live rows beyond them, one for each hole
        order = list(range(n))
        for hole, mover in zip(holes, movers):
            order[hole] = mover
        if holes:
            h, m = torch.tensor(holes, device=self._k.device), torch.tensor(movers, device=self._k.device)
            W = self.width
            for store in (self._k, self._v):
                store[:, h, :, :W] = store[:, m, :, :W]
        index = torch.tensor(order, device=self.mask.device)
        self.rows = [self.rows[i] for i in order]
        self.mask, self.logits = self.mask.index_select(0, index), self.logits.index_select(0, index)
        self._view()
        self.compact()
        return index.cpu()

    @torch.inference_mode()
    def compact(self) -> None:
        """Cut off the leading columns that no live row uses."""
        used = self.mask.bool().any(dim=0)
        first = int(used.nonzero()[0, 0]) if bool(used.any()) else self.width
        if first == 0:
            return
        W, B = self.width, len(self.rows)
        for store in (self._k, self._v):
            store[:, :B, :, : W - first] = store[:, :B, :, first:W].clone()
        self.cache.pos = W - first
        self.mask = self.mask[:, first:]

    def _make_room(self, columns: int) -> None:
        """Move every live row `columns` to the right (padding in front), so a longer prompt ends on the newest column."""
        W, B = self.width, len(self.rows)
        if W + columns > self.capacity:
            raise ValueError(f"no room for a prompt of {W + columns} columns within the context of {self.capacity}")
        self._store(B, W + columns + 1)
        for store in (self._k, self._v):
            store[:, :B, :, columns : columns + W] = store[:, :B, :, :W].clone()
            store[:, :B, :, :columns] = 0
        self.cache.pos = W + columns
        self.mask = torch.cat([self.mask.new_zeros(B, columns), self.mask], dim=1)
        self._view()
