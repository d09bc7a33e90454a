"""Collators: rows of token ids to padded batches (SFT) and to the distinct sequences of a batch of pairs (reward)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from pipeline.losses.lm import IGNORE


class PadCollator:
    """Right-pad ids with the pad token and labels with IGNORE; right padding needs no attention mask in a causal model."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        def padded(key: str, value: int) -> torch.Tensor:
            return pad_sequence([torch.as_tensor(r[key], dtype=torch.long) for r in rows], batch_first=True, padding_value=value)

        return {"input_ids": padded("input_ids", self.pad_id), "labels": padded("labels", IGNORE)}


def pack_sequences(seqs: Sequence[Sequence[int]], groups: Sequence, pad_id: int, share_prompts: bool = True, max_row: int = 1024, score_from: Sequence[int] | None = None) -> dict:
    """The distinct sequences `seqs` in one batch for one forward, each group's common prefix read once.

    With share_prompts, the sequences of one group (a prompt's answers) are packed in one row: their
    common prefix once, then each continuation, which sees the prefix and itself only, at the positions
    it would have alone (`positions` and `packed_mask` for the model). Where nothing is shared (or
    without share_prompts) the sequences are right-padded to (N, T) with an `attention_mask`.

    Either way `score_index` (N,) is each sequence's last token in the flattened rows (a reward model
    scores there), and with `score_from` (N,), where each sequence's scored part starts (its prompt
    length), `target_index`, `target_ids` and `target_seq` give, for every scored token, the flattened
    position of the logits that predict it, the token and its sequence: `sequence_logprobs` sums them.
    """
    layout = _pack(seqs, groups, max_row) if share_prompts else None
    if layout is None:
        ids, mask = _pad([[s] for s in seqs], pad_id)
        width = ids.size(1)
        at = [range(i * width, i * width + len(s)) for i, s in enumerate(seqs)]
        batch = {"input_ids": ids, "attention_mask": mask, "score_index": torch.tensor([i * width + len(s) - 1 for i, s in enumerate(seqs)], dtype=torch.long)}
    else:
        batch, at = _packed(seqs, layout, pad_id)
    if score_from is not None:
        index, targets, owner = [], [], []
        for i, (s, start) in enumerate(zip(seqs, score_from)):
            start = max(1, int(start))  # the first token has no logits before it
            index += at[i][start - 1 : len(s) - 1]
            targets += s[start:]
            owner += [i] * max(0, len(s) - start)
        batch.update(
            target_index=torch.tensor(index, dtype=torch.long),
            target_ids=torch.tensor(targets, dtype=torch.long),
            target_seq=torch.tensor(owner, dtype=torch.long),
        )
    return batch


def _pack(seqs: Sequence[Sequence[int]], groups: Sequence, max_row: int) -> list[list[tuple[int, list[int]]]] | None:
    """Rows of units (shared prefix length, sequence indices); None when no two sequences share a prefix.

    A unit is one group's sequences: their common prefix once, then what follows it in each. Units
    are packed first-fit, longest first, into rows as wide as the longest unit (or max_row).
    """
    members: dict = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    units, shared = [], False
    for group in members.values():
        prefix = 0
        if len(group) > 1:
            first = seqs[group[0]]
            prefix = min(len(seqs[i]) for i in group) - 1  # every sequence keeps its last token, where it is scored
            for i in group[1:]:
                prefix = next((k for k in range(prefix) if seqs[i][k] != first[k]), prefix)
        if prefix == 0:
            units += [(0, [i]) for i in group]
            continue
        shared = True
        part, used = [], prefix
        for i in group:  # a unit longer than max_row is split, each part repeating the prefix
            if part and used + len(seqs[i]) - prefix > max_row:
                units.append((prefix, part))
                part, used = [], prefix
            part.append(i)
            used += len(seqs[i]) - prefix
        units.append((prefix, part))
    if not shared:
        return None

    def size(unit) -> int:
        return unit[0] + sum(len(seqs[i]) - unit[0] for i in unit[1])

    width = max(size(u) for u in units)
    rows: list[list] = []
    free: list[int] = []
    for unit in sorted(units, key=size, reverse=True):
        r = next((r for r, room in enumerate(free) if room >= size(unit)), None)
        if r is None:
            rows.append([])
            free.append(width)
            r = len(rows) - 1
        rows[r].append(unit)
        free[r] -= size(unit)
    return rows


def _pad(rows: list[list[Sequence[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(sum(len(p) for p in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        tokens = [t for piece in row for t in piece]
        ids[r, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
        mask[r, : len(tokens)] = 1
    return ids, mask


def _packed(seqs: Sequence[Sequence[int]], rows: list[list[tuple[int, list[int]]]], pad_id: int) -> tuple[dict, list[list[int]]]:
    """Token ids, positions and the mask of packed rows (a piece sees itself, causally, and its group's prefix),
    and where each token of each sequence sits in the flattened rows."""
    pieces, piece_rows, starts, parents = [], [], [], []
    flat_start = {}  # piece -> its first flattened position
    owners: dict[int, tuple[int, int]] = {}  # sequence -> (prefix piece or -1, own piece)
    for r, row in enumerate(rows):
        line = []
        for prefix, members in row:
            parent = len(pieces) if prefix else -1
            if prefix:
                line.append(len(pieces))
                pieces.append(seqs[members[0]][:prefix])
                starts.append(0)
                parents.append(parent)
            for i in members:
                line.append(len(pieces))
                owners[i] = (parent, len(pieces))
                pieces.append(seqs[i][prefix:])
                starts.append(prefix)  # positions continue after the prefix, as in the sequence alone
                parents.append(parent if prefix else len(pieces) - 1)
        piece_rows.append((r, line))
    ids, mask = _pad([[pieces[p] for p in line] for _, line in piece_rows], pad_id)
    width = ids.size(1)
    piece_id = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
    parent_id = torch.full((len(rows), width), -1, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for r, line in piece_rows:
        at = 0
        for p in line:
            n = len(pieces[p])
            flat_start[p] = r * width + at
            piece_id[r, at : at + n] = p
            parent_id[r, at : at + n] = parents[p]
            positions[r, at : at + n] = torch.arange(starts[p], starts[p] + n)
            at += n
    order = torch.arange(width)
    causal = order[None, :] <= order[:, None]  # (T, T): key <= query
    keys, queries = piece_id[:, None, :], piece_id[:, :, None]
    visible = (keys == queries) | (keys == parent_id[:, :, None])  # its own piece, or the prefix it follows
    packed_mask = (causal & visible) | torch.eye(width, dtype=torch.bool)  # padding sees itself: no NaN rows
    token_at = []
    for i in range(len(seqs)):
        parent, own = owners[i]
        head = list(range(flat_start[parent], flat_start[parent] + len(pieces[parent]))) if parent >= 0 else []
        token_at.append(head + list(range(flat_start[own], flat_start[own] + len(pieces[own]))))
    index = torch.tensor([token_at[i][-1] for i in range(len(seqs))], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "positions": positions, "packed_mask": packed_mask[:, None], "score_index": index}, token_at


class PairCollator:
    """The distinct sequences of a batch of pairs, and where each pair's two sit.

    A response that appears in several pairs of the batch (InstructGPT's K-wise comparisons: every
    two of K answers to a prompt) is scored once; `chosen_index` and `rejected_index` (B,) pick
    each pair's sequences, so one forward scores every comparison.

    With share_prompts, the sequences of one prompt (same `prompt_key`; each row's own two where it
    has none) are packed in one row after a single copy of their common prefix (`pack_sequences`);
    the scores equal those of separate rows. Rows with a `prompt_len` also get the token targets of
    each response (`target_index`, `target_ids`, `target_seq`): DPO's log-probabilities.
    """

    def __init__(self, pad_id: int, share_prompts: bool = False, max_row: int = 1024):
        self.pad_id = pad_id
        self.share_prompts = share_prompts
        self.max_row = max_row  # a longer packed row is split (each part repeats the prefix)

    def __call__(self, rows: list[dict]) -> dict:
        slots: dict[tuple, int] = {}
        groups: list = []
        starts: list[int] = []

        def slot(ids, group, start) -> int:
            key = tuple(ids)
            if key not in slots:
                slots[key] = len(slots)
                groups.append(group)
                starts.append(start)
            return slots[key]

        keys = [r.get("prompt_key", -1 - i) for i, r in enumerate(rows)]
        has_prompt = all("prompt_len" in r for r in rows)
        chosen = [slot(r["chosen_ids"], k, r.get("prompt_len", 0)) for r, k in zip(rows, keys)]
        rejected = [slot(r["rejected_ids"], k, r.get("prompt_len", 0)) for r, k in zip(rows, keys)]
        batch = {
            "chosen_index": torch.tensor(chosen, dtype=torch.long),
            "rejected_index": torch.tensor(rejected, dtype=torch.long),
            "margin": torch.tensor([r["margin"] for r in rows], dtype=torch.float32),
            "gold_sign": torch.tensor([r["gold_sign"] for r in rows], dtype=torch.float32),
        }
        packed = pack_sequences(list(slots), groups, self.pad_id, self.share_prompts, self.max_row, starts if has_prompt else None)
        return {**packed, **batch}
