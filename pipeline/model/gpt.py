"""The GPT backbone that every stage shares: the model, its KV cache and a scalar head (sampling: engine.py).

Decoder-only, pre-norm transformer. Choices that the export to `transformers` relies on are config
fields: learned positions + LayerNorm + GELU MLP (GPT-2 style), or rotary positions + RMSNorm +
SwiGLU MLP (Llama style). Attention goes through `scaled_dot_product_attention`, which picks flash
kernels on a GPU. Shapes in comments: B batch, T time, C channels, nh heads, nkv key/value heads,
hs head size, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


def _is_number(value, integer: bool = False) -> bool:
    """An int (or float unless `integer`), never a bool: a config value from a command line may be any of them."""
    return not isinstance(value, bool) and isinstance(value, int if integer else (int, float))


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # rows of the embedding; the tokenizer's size rounded up to a multiple of 64
    block_size: int = 256  # the longest sequence (prompt + response) the model is trained on
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # query heads
    n_kv_head: int | None = None  # key/value heads; fewer than n_head = grouped-query attention
    n_embd: int = 128  # width of the residual stream
    # Width of each attention head; None: n_embd // n_head. Set where the heads do not fill the residual width
    # (a model whose heads were pruned: attention is n_embd -> n_head * head_dim -> n_embd). Llama's field of that name.
    head_dim: int | None = None
    mlp_ratio: float = 4.0  # hidden width of the MLP over n_embd (SwiGLU uses 2/3 of it, as Llama does)
    mlp_hidden_size: int | None = None  # explicit hidden width, overriding mlp_ratio (imported models have any width)
    dropout: float = 0.0  # on attention weights and residual branches; RL turns it off
    bias: bool = False  # biases in Linear layers and LayerNorm (GPT-2 has them)
    pos_emb: str = "rope"  # "rope" (rotary) or "learned" (absolute, GPT-2)
    norm: str = "rmsnorm"  # "rmsnorm" or "layernorm"
    mlp: str = "swiglu"  # "swiglu" or "gelu"
    rope_theta: float = 10000.0  # base of the rotary frequencies
    tie_embeddings: bool = True  # the output head shares the token embedding matrix
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        # Sizes first: the divisibility checks below would divide by a zero head count.
        optional = [name for name in ("head_dim", "mlp_hidden_size") if getattr(self, name) is not None]
        sizes = ["vocab_size", "block_size", "n_layer", "n_head", "n_kv_head", "n_embd"] + optional
        for name in sizes:
            if not _is_number(getattr(self, name), integer=True) or getattr(self, name) < 1:
                raise ValueError(f"model config: {name}={getattr(self, name)!r} must be an integer >= 1")
        for name in ("mlp_ratio", "rope_theta", "norm_eps"):
            if not _is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"model config: {name}={getattr(self, name)!r} must be > 0")
        if not _is_number(self.dropout) or not 0 <= self.dropout < 1:
            raise ValueError(f"model config: dropout={self.dropout!r} must be in [0, 1)")
        if self.head_dim is not None and self.n_embd == self.n_head * self.head_dim:
            self.head_dim = None  # the derived width: one config, one way to write it (old files have no head_dim)
        checks = [
            (self.head_dim is not None or self.n_embd % self.n_head == 0, f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set head_dim)"),
            (self.n_head % self.n_kv_head == 0, f"n_head={self.n_head} must be divisible by n_kv_head={self.n_kv_head}"),
            (self.pos_emb in ("rope", "learned"), f"pos_emb must be 'rope' or 'learned', not {self.pos_emb!r}"),
            (self.norm in ("rmsnorm", "layernorm"), f"norm must be 'rmsnorm' or 'layernorm', not {self.norm!r}"),
            (self.mlp in ("swiglu", "gelu"), f"mlp must be 'swiglu' or 'gelu', not {self.mlp!r}"),
            (self.pos_emb != "rope" or self.head_size % 2 == 0, "rotary positions need an even head size"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"model config: {message}")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.n_embd // self.n_head

    @property
    def attn_width(self) -> int:
        """The queries' (and attention output's) width, n_head * head_size: n_embd unless head_dim says otherwise."""
        return self.n_head * self.head_size

    @property
    def mlp_hidden(self) -> int:
        if self.mlp_hidden_size is not None:
            return self.mlp_hidden_size
        hidden = int(self.mlp_ratio * self.n_embd)
        if self.mlp == "swiglu":  # three matrices instead of two: keep the parameter count comparable
            hidden = 64 * math.ceil(2 * hidden / 3 / 64)
        return hidden

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"model config: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def pad_vocab(size: int, multiple: int = 64) -> int:
    """Round a tokenizer's size up so that the embedding matmuls hit fast kernel shapes."""
    return multiple * math.ceil(size / multiple)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, config.norm_eps)
    return nn.LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


def rotary_tables(config: GPTConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, each (length, hs/2)."""
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_size, 2, dtype=torch.float32) / config.head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of x (B, nh, T, hs) by the angles cos/sin (B, 1, T, hs/2)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


class KVCache:
    """Keys and values of every layer, preallocated for the whole generation and filled in place.

    Prefill writes the prompt's keys once; each decode step appends one position. `pos` counts the
    positions written so far and advances after the last layer has stored its keys.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int, device, dtype):
        shape = (config.n_layer, batch_size, config.n_kv_head, max_len, config.head_size)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0

    @property
    def max_len(self) -> int:
        return self.k.size(3)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nkv, T, hs) at the current position; return everything cached so far."""
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, steps: int) -> None:
        self.pos += steps

    def repeat_interleave(self, n: int) -> None:
        """Give each row n copies, in place: (B, ...) -> (B*n, ...), row b*n+i a copy of row b.

        Several samples of one prompt then share the prompt's prefill (GRPO's groups).
        """
        self.k = self.k.repeat_interleave(n, dim=1)
        self.v = self.v.repeat_interleave(n, dim=1)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.n_kv_head, config.head_size
        self.q_proj = nn.Linear(config.n_embd, config.attn_width, bias=config.bias)
        self.kv_proj = nn.Linear(config.n_embd, 2 * config.n_kv_head * config.head_size, bias=config.bias)
        self.out_proj = nn.Linear(config.attn_width, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary, mask, kv_cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_size).transpose(1, 2)  # (B, nh, T, hs)
        k, v = self.kv_proj(x).view(B, T, 2, self.n_kv_head, self.head_size).permute(2, 0, 3, 1, 4)  # 2 x (B, nkv, T, hs)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            k, v = kv_cache.store(self.layer, k, v)  # (B, nkv, T_cached, hs)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=mask is None and kv_cache is None,
            enable_gqa=self.n_kv_head != self.n_head,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_size)  # (B, T, nh*hs): C unless head_dim is set
        return self.resid_dropout(self.out_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gated = config.mlp == "swiglu"
        hidden = config.mlp_hidden
        self.up_proj = nn.Linear(config.n_embd, hidden * (2 if self.gated else 1), bias=config.bias)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        h = self.up_proj(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")  # GPT-2's GELU, so exported weights give equal logits
        return self.dropout(self.down_proj(h))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.norm_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.norm_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, rotary, mask, kv_cache, checkpoint: bool = False):
        if checkpoint:
            # Activation checkpointing: only the block's input is kept; the backward pass runs the block again
            # (dropout draws the same masks: the RNG state is replayed). Inside the block, so that an FSDP unit
            # wrapping it gathers its weights for the recompute as for the forward.
            return torch.utils.checkpoint.checkpoint(self._forward, x, rotary, mask, kv_cache, use_reentrant=False)
        return self._forward(x, rotary, mask, kv_cache)

    def _forward(self, x, rotary, mask, kv_cache):
        x = x + self.attn(self.norm_1(x), rotary, mask, kv_cache)
        return x + self.mlp(self.norm_2(x))


def attention_mask_4d(attention_mask: torch.Tensor, query_len: int, past_len: int) -> torch.Tensor:
    """Boolean (B, 1, T, past+T) mask: causal, hides padding keys, and always lets a query see itself.

    attention_mask (B, past+T) is 1 for real tokens and 0 for padding. Letting every position see
    itself keeps padded queries (whose outputs nobody reads) from a softmax over nothing, which would
    give NaN and poison the batch.
    """
    total = past_len + query_len
    device = attention_mask.device
    query_pos = torch.arange(past_len, total, device=device)[:, None]  # (T, 1)
    key_pos = torch.arange(total, device=device)[None, :]  # (1, past+T)
    causal = key_pos <= query_pos  # (T, past+T)
    keys = attention_mask[:, None, None, :total].bool()  # (B, 1, 1, past+T)
    return (causal & keys) | (key_pos == query_pos)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token, so left padding shifts nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class GPT(nn.Module):
    """The language model: token ids (B, T) -> next-token logits (B, T, V).

    `activation_checkpointing` (a runtime switch, not a config field: set_activation_checkpointing) keeps
    only each block's input in a forward that records gradients, and recomputes the block in the
    backward pass: activation memory of one block instead of n_layer, for about one more forward.
    Forwards without gradients (evaluation, sampling with the KV cache) run as they are.
    """

    activation_checkpointing: bool = False

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.pos_emb == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        if config.pos_emb == "rope":
            # Non-persistent: recomputed, so checkpoints stay small and a longer table costs nothing to load.
            cos, sin = rotary_tables(config, config.block_size)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaled init: each residual branch adds to the stream, so shrink the last projection
        # of each by 1/sqrt(2 * n_layer) to keep the stream's variance flat with depth.
        for name, p in self.named_parameters():
            if name.endswith(("out_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting tied weights once; without position embeddings by default (as FLOP counts do)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.wpe is not None:
            n -= self.wpe.weight.numel()
        return n

    def hidden_states(
        self,
        idx: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        packed: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Final-normed hidden states (B, T, C) of token ids idx (B, T).

        attention_mask (B, past+T), 1 for real tokens, is needed only with padding; with a KV cache it
        covers the cached positions too. Without a mask and without a cache attention is plain causal
        (the flash path).

        packed = (positions (B, T), mask (B, 1, T, T) bool) scores several sequences packed in one row,
        e.g. the answers to one prompt after a single copy of it: each token takes its position in
        its own sequence and attends only where mask allows (see reward.PairCollator).
        """
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.config.block_size
        # A packed row may be longer than the context; its sequences are not (their positions index the tables).
        if packed is None and (past + T > limit or past + T > self.config.block_size):
            raise ValueError(
                f"sequence of {past + T} tokens is longer than the model's context (block_size={self.config.block_size})"
            )
        if packed is not None:
            if attention_mask is not None or kv_cache is not None:
                raise ValueError("packed sequences take their own positions and mask: no attention_mask or kv_cache")
            positions, mask = packed
        elif attention_mask is not None:
            positions = positions_from_mask(attention_mask)[:, past : past + T]  # (B, T)
            mask = attention_mask_4d(attention_mask, T, past)
        else:
            positions = torch.arange(past, past + T, device=idx.device).expand(B, T)
            # A single new token attends to everything cached; a longer chunk after a cache needs an explicit causal mask.
            mask = None if (kv_cache is None or T == 1) else attention_mask_4d(idx.new_ones(B, past + T), T, past)
        x = self.wte(idx)  # (B, T, C)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rotary = (self.rope_cos[positions][:, None], self.rope_sin[positions][:, None])  # 2 x (B, 1, T, hs/2)
        x = self.drop(x)
        checkpoint = self.checkpoints_blocks(kv_cache)
        for block in self.blocks:
            x = block(x, rotary, mask, kv_cache, checkpoint=checkpoint)
        if kv_cache is not None:
            kv_cache.advance(T)
        return self.norm_f(x)

    def checkpoints_blocks(self, kv_cache: KVCache | None = None) -> bool:
        """Whether a forward here and now runs its blocks under activation checkpointing: switched on, recording gradients, no KV cache."""
        return self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()

    def forward(self, idx, attention_mask=None, kv_cache=None, packed=None, keep=None) -> torch.Tensor:
        """Logits (B, T, V); with `keep`, an index into the (B, T) positions, only those of the kept ones.

        keep is a (B, T) bool mask (SFT: the positions that carry a loss; logits (N, V) in row-major order) or a
        pair of slices (PPO: the columns that predict the response; (B, N, V), no host sync on a GPU). The output
        head and the softmax, a quarter of a tiny model's compute, then skip the prompt.
        """
        hidden = self.hidden_states(idx, attention_mask, kv_cache, packed)  # (B, T, C)
        return self.lm_head(hidden if keep is None else hidden[keep])  # (B, T, V) or (N, V)

    def new_kv_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty cache in the dtype the keys and values are computed in: autocast's where it is on, else the weights'.

        Under autocast (Lightning's bf16-mixed / 16-mixed) the projections give bf16 / fp16 keys; a float32
        cache would hold them at twice the memory and cast at every step.
        """
        p = self.wte.weight
        device_type = p.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else p.dtype
        return KVCache(self.config, batch_size, max_len, p.device, dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6N for the matmuls plus 12*L*H*hs*T for attention."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_size * seq_len


class ScalarGPT(GPT):
    """The same backbone with a scalar head: a reward model or a value model.

    forward returns one value per position (B, T); a reward model reads it at the last real token.
    The language-model head stays (tied, so it costs no parameters) so that weights load both ways.
    """

    def __init__(self, config: GPTConfig):
        super().__init__(config)
        self.score_head = nn.Linear(config.n_embd, 1, bias=True)
        nn.init.normal_(self.score_head.weight, std=1.0 / math.sqrt(config.n_embd + 1))
        nn.init.zeros_(self.score_head.bias)

    def forward(self, idx, attention_mask=None, kv_cache=None, packed=None) -> torch.Tensor:
        return self.score_head(self.hidden_states(idx, attention_mask, kv_cache, packed)).squeeze(-1)  # (B, T)


def set_activation_checkpointing(model: nn.Module, on: bool) -> None:
    """Turn activation checkpointing of a GPT / ScalarGPT (LoRA or not) on or off; see GPT."""
    if not isinstance(model, GPT):
        raise TypeError(f"activation checkpointing is a switch of GPT models, not of {type(model).__name__}")
    model.activation_checkpointing = bool(on)


def decay_param_groups(model: nn.Module | Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: biases, norm gains (1-D) stay undecayed.

    `model` is a module (its parameters that require grad) or the parameters themselves (one adapter of several).
    """
    params = [p for p in (model.parameters() if isinstance(model, nn.Module) else model) if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index (B,) of each row's last real token, for right- or left-padded rows."""
    T = attention_mask.size(1)
    positions = torch.arange(T, device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values
