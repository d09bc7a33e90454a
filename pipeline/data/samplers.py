"""Samplers: the order in which training rows meet, and which rows share a batch."""

from __future__ import annotations

import torch


class GroupedSampler(torch.utils.data.Sampler):
    """Shuffled indices in which rows of one group stay together and each batch holds rows of similar length.

    Each epoch: shuffle the groups (rows sharing a `groups` key; each row its own group without
    keys), cut them into chunks of about `chunk` batches, sort each chunk's groups by their longest
    row (longest first, stable, so no lengths means no sorting), cut the chunks into batches and
    shuffle the order of the batches. Rows meet in random company and order, as with plain
    shuffling, but a batch's rows share a width, and a prompt's pairs share a batch (a group longer
    than a batch, or one that straddles a chunk's batch edge, is split). Under DDP Lightning deals
    the indices out in turn, so each rank's batch comes from a few adjacent ones.
    """

    def __init__(self, batch_size: int, lengths: list[int] | None = None, groups: list | None = None, seed: int = 0, chunk: int = 32):
        if lengths is None and groups is None:
            raise ValueError("GroupedSampler needs row lengths, group keys or both")
        n = len(lengths if lengths is not None else groups)
        members: dict = {}
        for i, key in enumerate(groups if groups is not None else range(n)):
            members.setdefault(key, []).append(i)
        self.units = list(members.values())
        self.widths = [max(lengths[i] for i in unit) for unit in self.units] if lengths is not None else [0] * len(self.units)
        self.n, self.batch_size, self.seed, self.chunk, self.epoch = n, batch_size, seed, chunk, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1  # a fresh order each pass even where nobody calls set_epoch
        order = torch.randperm(len(self.units), generator=g).tolist()
        rows_per_chunk = self.batch_size * self.chunk
        batches, chunk, size = [], [], 0
        for u in order + [None]:
            if u is not None:
                chunk.append(u)
                size += len(self.units[u])
            if chunk and (u is None or size >= rows_per_chunk):
                rows = [i for v in sorted(chunk, key=self.widths.__getitem__, reverse=True) for i in self.units[v]]
                batches += [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
                chunk, size = [], 0
        full = [b for b in batches if len(b) == self.batch_size]
        rest = [i for b in batches if len(b) < self.batch_size for i in b]
        for i in torch.randperm(len(full), generator=g).tolist():
            yield from full[i]
        yield from rest  # short batches last, dropped by drop_last
