"""Structured pruning: a smaller GPT (fewer heads, MLP channels or blocks) with the kept weights copied, not masked.

Three steps, each usable alone (the stage is pipeline/stages/prune.py):

    calib = calibrate(model, sequences, pad_id)          # activation statistics on calibration text (forward hooks)
    scores = importance(model, "wanda", calib)           # one score per KV group, MLP channel and block
    plan = plan_pruning(model, 0.7, {"heads": 0.3, "channels": 0.7}, scores)
    smaller = apply_plan(model, plan)                    # a new GPT of a smaller GPTConfig
    plan = plan_for_config(model, student_config, scores)  # or: the kept units for a given smaller shape (stage=distill's start)

The units, and what a score is:
- a head group: one key/value head with the query heads that read it (n_head / n_kv_head of them; one
  head without grouped-query attention). Whole groups go, so the query-to-KV ratio stays and nothing
  else changes shape; the width of a head stays (GPTConfig.head_dim records it once n_head * head_dim
  is narrower than n_embd).
- an MLP channel: one hidden unit (SwiGLU: its gate and up rows; both: its down_proj column).
- a block: the whole residual block (attention + MLP).
Every kept block keeps the same number of groups and channels (one GPTConfig has one n_head and one
mlp_hidden_size); which ones each block keeps is that block's own choice by score.

Scores of groups and channels (`method`):
- `magnitude`: the product of the norms of the weights the unit's signal passes through: a head's
  value rows and its out_proj columns (the query and key rows only shape where it looks), a channel's
  gate and up rows and its down_proj column. A unit whose weights are zero scores 0.
- `wanda`: Wanda's |W_ij| * ||X_j||_2 (X_j: input feature j over the calibration tokens) summed over
  the weights that read the unit's own activation: out_proj's columns of a head, down_proj's column
  of a channel. That is the unit's size in the residual stream on real text. The unit's input rows
  are left out: their input (the block's normed residual stream) is the same for every unit of a
  block, so they would add only a data-free magnitude term.
Blocks, by either method: ShortGPT's Block Influence, 1 - the mean cosine similarity of a block's
input and output hidden states on the calibration tokens (a block that changes nothing scores 0).

What the ratio counts: GPT.num_params(), the project's parameter count everywhere (model/params):
every parameter once (tied embeddings once), the token embedding included, learned position
embeddings not. The embedding is never pruned, so the rest gives up more than 1 - ratio of its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.model.gpt import GPT, GPTConfig

METHODS = ("magnitude", "wanda")
TARGETS = ("blocks", "heads", "channels")  # coarse to fine: the finest target with a share takes what rounding leaves
GPT2_STYLE = {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}  # hf.ARCHITECTURES["gpt2"]


def exportable_group_counts(config: GPTConfig) -> list[int]:
    """The numbers of head groups a pruned model may keep and still export to transformers (pipeline/model/hf.py).

    GPT-2 style: all of them only (GPT2Config derives the head width as n_embd / n_head). Llama: those
    whose query heads divide n_embd (transformers' LlamaConfig refuses hidden_size % num_attention_heads
    != 0 even with head_dim set, at creation and at loading). Any other architecture exports in no case.
    """
    per_group = config.n_head // config.n_kv_head
    if all(getattr(config, k) == v for k, v in GPT2_STYLE.items()):
        return [config.n_kv_head]
    if config.pos_emb == "rope" and config.norm == "rmsnorm" and config.mlp == "swiglu":
        return [g for g in range(1, config.n_kv_head + 1) if config.n_embd % (g * per_group) == 0]
    return list(range(1, config.n_kv_head + 1))


# ---------------------------------------------------------------------------------------------
# Calibration: activation statistics from forward hooks


@dataclass
class Calibration:
    """Per block: the summed squares of each input feature of out_proj (the heads' outputs) and of down_proj (the channels' activations); Block Influence."""

    attn_out: list[torch.Tensor]  # per block (n_head * hs,)
    mlp_out: list[torch.Tensor]  # per block (hidden,)
    block_influence: torch.Tensor  # (n_layer,)
    tokens: int


@torch.no_grad()
def calibrate(model: GPT, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> Calibration:
    """Run the model over calibration sequences (right-padded; padding ignored) and gather what importance() needs."""
    if not sequences:
        raise ValueError("calibrate: no calibration sequences")
    config = model.config
    L = config.n_layer
    attn_out = [torch.zeros(config.attn_width) for _ in range(L)]
    mlp_out = [torch.zeros(config.mlp_hidden) for _ in range(L)]
    cosine = torch.zeros(L, dtype=torch.float64)
    current: dict[str, torch.Tensor] = {}  # the batch's real-token mask (B, T), read by the hooks

    def squares(store: list[torch.Tensor], i: int):
        def hook(module, args):
            x = args[0].detach().float()[current["mask"]]  # (tokens, features)
            store[i] += (x * x).sum(0).cpu()

        return hook

    def influence(i: int):
        def hook(module, args, output):
            cos = F.cosine_similarity(args[0].float(), output.float(), dim=-1)[current["mask"]]
            cosine[i] += cos.double().sum().cpu()

        return hook

    handles = []
    for i, block in enumerate(model.blocks):
        handles.append(block.attn.out_proj.register_forward_pre_hook(squares(attn_out, i)))
        handles.append(block.mlp.down_proj.register_forward_pre_hook(squares(mlp_out, i)))
        handles.append(block.register_forward_hook(influence(i)))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens = 0
    try:
        for start in range(0, len(sequences), batch_size):
            batch = [list(s)[: config.block_size] for s in sequences[start : start + batch_size]]
            T = max(len(s) for s in batch)
            ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
            mask = torch.zeros(len(batch), T, dtype=torch.long)
            for r, s in enumerate(batch):
                ids[r, : len(s)], mask[r, : len(s)] = torch.tensor(s, dtype=torch.long), 1
            ids, mask = ids.to(device), mask.to(device)
            current["mask"] = mask.bool()
            model.hidden_states(ids, attention_mask=mask)
            tokens += int(mask.sum())
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return Calibration(attn_out, mlp_out, (1 - cosine / max(tokens, 1)).float(), tokens)


# ---------------------------------------------------------------------------------------------
# Importance


@dataclass
class Scores:
    groups: torch.Tensor  # (n_layer, n_kv_head): each head group of each block
    channels: torch.Tensor  # (n_layer, hidden)
    blocks: torch.Tensor  # (n_layer,)


@torch.no_grad()
def importance(model: GPT, method: str, calib: Calibration | None) -> Scores:
    """Scores of every head group, MLP channel and block (see the module's docstring); higher is kept first."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; methods are {METHODS}")
    if calib is None:
        raise ValueError("importance: blocks are scored on calibration data (Block Influence); calibrate first")
    config = model.config
    hidden, hs, per_group, kv = config.mlp_hidden, config.head_size, config.n_head // config.n_kv_head, config.n_kv_head * config.head_size
    groups, channels = [], []
    for i, block in enumerate(model.blocks):
        attn, mlp = block.attn, block.mlp
        w_o = attn.out_proj.weight.float()  # (C, nh*hs)
        w_down = mlp.down_proj.weight.float()  # (C, hidden)
        if method == "magnitude":
            values = attn.kv_proj.weight.float()[kv:].view(config.n_kv_head, -1).norm(dim=1)  # (nkv,): each value head's rows
            head_out = w_o.view(-1, config.n_head, hs).norm(dim=(0, 2))  # (nh,): each head's out_proj columns
            groups.append(values * head_out.view(config.n_kv_head, per_group).sum(1))
            rows = mlp.up_proj.weight.float().norm(dim=1)  # (hidden or 2*hidden,)
            into = rows[:hidden] * rows[hidden:] if mlp.gated else rows
            channels.append(into * w_down.norm(dim=0))
        else:
            x_norm = calib.attn_out[i].sqrt()  # (nh*hs,)
            per_feature = w_o.abs().sum(0) * x_norm  # Wanda's score summed over each column of out_proj
            groups.append(per_feature.view(config.n_kv_head, per_group * hs).sum(1))
            channels.append(w_down.abs().sum(0) * calib.mlp_out[i].sqrt())
    return Scores(torch.stack(groups).cpu(), torch.stack(channels).cpu(), calib.block_influence.clone())


# ---------------------------------------------------------------------------------------------
# The plan: how many of each unit go, and which


@dataclass
class Plan:
    blocks: list[int]  # the kept blocks (their indices in the source model), in order
    groups: list[list[int]]  # per kept block: the kept head groups, in order
    channels: list[list[int]]  # per kept block: the kept MLP channels, in order
    params: int = 0  # num_params() of the pruned model
    source_params: int = 0
    counts: dict = field(default_factory=dict)  # removed blocks, groups per block, channels per block

    @property
    def ratio(self) -> float:
        return self.params / self.source_params

    def to_dict(self) -> dict:
        return asdict(self)


def unit_costs(config: GPTConfig) -> dict[str, int]:
    """Parameters one unit holds: a whole block, one head group of one block, one MLP channel of one block."""
    C, hs, per_group, b = config.n_embd, config.head_size, config.n_head // config.n_kv_head, int(config.bias)
    group = (per_group * hs) * (C + b) + 2 * hs * (C + b) + per_group * hs * C  # q rows, k and v rows, out_proj columns
    channel = (2 if config.mlp == "swiglu" else 1) * (C + b) + C  # up (and gate) rows, the down_proj column
    norms = 2 * C * (1 + (b if config.norm == "layernorm" else 0))
    block = config.n_kv_head * group + config.mlp_hidden * channel + b * 2 * C + norms  # + out_proj and down_proj biases
    return {"blocks": block, "heads": group, "channels": channel}


def pruned_config(config: GPTConfig, n_layer: int, n_groups: int, channels: int) -> GPTConfig:
    from pipeline.model.hf import mlp_fields

    per_group = config.n_head // config.n_kv_head
    values = {**config.to_dict(), "n_layer": n_layer, "n_head": n_groups * per_group, "n_kv_head": n_groups, "head_dim": config.head_size}
    if channels != config.mlp_hidden:  # the width as an import of the exported model writes it, so round trips keep the config
        values.update({"mlp_hidden_size": None, **mlp_fields(channels, config.n_embd, config.mlp)})
    return GPTConfig(**values)  # head_dim goes back to None where the kept heads fill n_embd


def check_targets(targets: dict) -> dict[str, float]:
    """{blocks, heads, channels: share} with shares >= 0 and at least one > 0; missing kinds get 0."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"prune targets {unknown} are unknown; targets are {list(TARGETS)}")
    shares = {k: float(targets.get(k) or 0) for k in TARGETS}
    if any(v < 0 for v in shares.values()) or not any(shares.values()):
        raise ValueError(f"prune targets {shares}: shares must be >= 0 and at least one > 0")
    return shares


def unit_counts(model: GPT, ratio: float, targets: dict, heads: bool | None = None) -> tuple[dict[str, int], GPTConfig]:
    """How many blocks go, and head groups and channels from every kept block, for `ratio`; and the smaller config.

    `targets` splits the parameters to remove between the kinds (shares, normalised by their sum).
    Blocks are decided first, then head groups, then channels, each count rounded to whole units (and
    at least one of each kept); the finest kind with a share takes what is left, so the ratio is met to
    within half of one of its units in every kept block (a channel: 3 * n_embd parameters per block for
    SwiGLU). Head groups go only in counts the export can express (exportable_group_counts; a GPT-2-style
    model keeps all its heads, and their share moves to the other kinds); `heads=True` allows any count,
    `heads=False` none. The counts need no scores: a bad ratio fails before any calibration.
    """
    config = model.config
    if not 0 < ratio <= 1:
        raise ValueError(f"prune ratio {ratio} must be in (0, 1]")
    shares = check_targets(targets)
    L, G, H = config.n_layer, config.n_kv_head, config.mlp_hidden
    kept_groups = {None: exportable_group_counts(config), True: list(range(1, G + 1)), False: [G]}[heads]
    removable = sorted(G - g for g in kept_groups)  # head groups that may go from every block, 0 first
    if removable == [0] and shares["heads"]:
        shares["heads"] = 0.0
        if not any(shares.values()):
            raise UserError(
                f"prune.targets: only heads were to be pruned, and this model cannot lose any and still export to transformers "
                f"(GPT-2 needs n_head * head_dim = n_embd; Llama needs n_embd={config.n_embd} divisible by n_head); add channels or blocks"
            )
    total = sum(shares.values())
    source = model.num_params()
    budget = source - ratio * source  # parameters to remove
    cost = unit_costs(config)
    last = [k for k in TARGETS if shares[k] > 0][-1]
    removed = 0.0
    counts = {"blocks": 0, "heads": 0, "channels": 0}
    for kind in TARGETS:
        if shares[kind] == 0:
            continue
        want = (budget - removed) if kind == last else shares[kind] / total * budget
        per_unit = cost[kind] if kind == "blocks" else cost[kind] * (L - counts["blocks"])  # a group or channel goes from every kept block
        if kind == "heads":  # the allowed count nearest to the share (the fewer on a tie)
            counts[kind] = min(removable, key=lambda n: abs(want - n * per_unit))
        else:
            counts[kind] = max(0, min(L - 1 if kind == "blocks" else H - 1, round(want / per_unit)))
        removed += counts[kind] * per_unit
    smaller = pruned_config(config, L - counts["blocks"], G - counts["heads"], H - counts["channels"])
    reached = (source - removed) / source
    if reached > ratio + 0.05:
        raise UserError(
            f"prune.ratio={ratio}: the smallest model these targets allow keeps {reached:.3f} of the parameters "
            f"(the token embedding alone holds {model.wte.weight.numel() / source:.3f}); raise prune.ratio or add targets"
        )
    return counts, smaller


def _select(model: GPT, scores: Scores, n_layer: int, n_groups: int, n_channels: int, counts: dict) -> Plan:
    """The n_layer best blocks and, in each, the n_groups best head groups and n_channels best channels, in their order."""
    top = lambda values, k: sorted(torch.argsort(values, descending=True, stable=True)[:k].tolist())  # noqa: E731
    kept_blocks = top(scores.blocks, n_layer)
    groups = [top(scores.groups[b], n_groups) for b in kept_blocks]
    channels = [top(scores.channels[b], n_channels) for b in kept_blocks]
    with torch.device("meta"):  # the count only: no memory, no random draws
        params = GPT(pruned_config(model.config, n_layer, n_groups, n_channels)).num_params()
    return Plan(kept_blocks, groups, channels, params=params, source_params=model.num_params(), counts=counts)


def plan_pruning(model: GPT, ratio: float, targets: dict, scores: Scores, heads: bool | None = None) -> Plan:
    """Which blocks, head groups and channels stay so that num_params() comes to `ratio` of the model's (unit_counts), by score."""
    counts, smaller = unit_counts(model, ratio, targets, heads)
    return _select(model, scores, smaller.n_layer, smaller.n_kv_head, smaller.mlp_hidden, counts)


# Fields a model pruned to another config must share with it: everything but the counts of blocks, heads and channels.
SHARED_FIELDS = ("vocab_size", "n_embd", "head_size", "pos_emb", "norm", "mlp", "bias", "tie_embeddings", "rope_theta", "norm_eps")


def shape_mismatch(source: GPTConfig, target: GPTConfig) -> str | None:
    """Why `target` is not a part of `source` (None when it is): pruning can only drop blocks, head groups and channels.

    A part has the source's width, head width, vocabulary and architecture, the same queries per
    key/value head, no more blocks, groups or channels, and (learned positions) the same context.
    """
    differ = [f"{k}={getattr(target, k)} (the source's {getattr(source, k)})" for k in SHARED_FIELDS if getattr(target, k) != getattr(source, k)]
    if target.n_head // target.n_kv_head != source.n_head // source.n_kv_head:
        differ.append(f"{target.n_head // target.n_kv_head} query heads per key/value head (the source's {source.n_head // source.n_kv_head})")
    if target.pos_emb == "learned" and target.block_size != source.block_size:
        differ.append(f"block_size={target.block_size} with learned positions (the source's {source.block_size})")
    more = [f"{name}={a} (the source has {b})" for name, a, b in (("n_layer", target.n_layer, source.n_layer), ("n_kv_head", target.n_kv_head, source.n_kv_head), ("MLP channels", target.mlp_hidden, source.mlp_hidden)) if a > b]
    reasons = differ + more
    return "; ".join(reasons) if reasons else None


def plan_for_config(model: GPT, target: GPTConfig, scores: Scores) -> Plan:
    """Which blocks, head groups and channels stay so that the pruned model has `target`'s shape (shape_mismatch must be None)."""
    why = shape_mismatch(model.config, target)
    if why:
        raise ValueError(f"the target config is not a part of the source model: {why}")
    config = model.config
    counts = {"blocks": config.n_layer - target.n_layer, "heads": config.n_kv_head - target.n_kv_head, "channels": config.mlp_hidden - target.mlp_hidden}
    return _select(model, scores, target.n_layer, target.n_kv_head, target.mlp_hidden, counts)


# ---------------------------------------------------------------------------------------------
# The smaller model


@torch.no_grad()
def apply_plan(model: GPT, plan: Plan) -> GPT:
    """A new model of the plan's smaller config, holding the kept rows and columns of model's weights (model is unchanged)."""
    config = model.config
    smaller = pruned_config(config, len(plan.blocks), len(plan.groups[0]), len(plan.channels[0]))
    hs, per_group, hidden = config.head_size, config.n_head // config.n_kv_head, config.mlp_hidden
    old = model.state_dict()
    state = {k: v for k, v in old.items() if not k.startswith("blocks.")}
    for new, (b, groups, channels) in enumerate(zip(plan.blocks, plan.groups, plan.channels)):
        src, dst = f"blocks.{b}.", f"blocks.{new}."
        # Query head h reads kv head h // per_group (SDPA's enable_gqa): a group's queries are contiguous.
        q = torch.cat([torch.arange(g * per_group * hs, (g + 1) * per_group * hs) for g in groups])
        keys = torch.cat([torch.arange(g * hs, (g + 1) * hs) for g in groups])
        kv = torch.cat([keys, keys + config.n_kv_head * hs])  # kv_proj's outputs: all keys, then all values
        ch = torch.tensor(channels, dtype=torch.long)
        up = torch.cat([ch, ch + hidden]) if config.mlp == "swiglu" else ch  # the gate half, then the up half
        rows = {"attn.q_proj": q, "attn.kv_proj": kv, "mlp.up_proj": up}
        columns = {"attn.out_proj": q, "mlp.down_proj": ch}
        for key, value in old.items():
            if not key.startswith(src):
                continue
            name = key[len(src) :]
            module, kind = name.rsplit(".", 1)
            if module in rows:
                value = value.index_select(0, rows[module])
            elif module in columns and kind == "weight":
                value = value.index_select(1, columns[module])
            state[dst + name] = value.clone()
    with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's random stream
        out = type(model)(smaller)
    out.load_state_dict(state, strict=True)
    out.to(device=model.wte.weight.device, dtype=model.wte.weight.dtype)
    return out.train(model.training)


def prune_model(model: GPT, ratio: float, targets: dict, method: str, calib: Calibration | None) -> tuple[GPT, Plan]:
    """importance -> plan -> the smaller model, in one call."""
    plan = plan_pruning(model, ratio, targets, importance(model, method, calib))
    return apply_plan(model, plan), plan
