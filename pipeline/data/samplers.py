"""Samplers: the order in which training rows meet, and which rows share a batch.

Every order here is a function of (seed, epoch) alone, never of a global generator, so a resumed
run can recompute the order of the epoch it stopped in and skip what it already trained on.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch.utils.data import DistributedSampler


def row_lengths(ds, *columns: str) -> list[int]:
    """Each row's longest sequence over `columns` (list columns of a datasets.Dataset), read from Arrow in one pass.

    What the samplers group by; iterating the rows in Python instead costs seconds per 100k rows.
    """
    import pyarrow.compute as pc

    table = ds.select_columns(list(columns)).with_format("arrow")[:]  # the rows in the dataset's order (its indices applied)
    lengths = [pc.list_value_length(table[c]).fill_null(0).to_numpy(zero_copy_only=False) for c in columns]
    return np.maximum.reduce(lengths).astype(np.int64).tolist()


def column_values(ds, column: str) -> list:
    """One column of a datasets.Dataset as a Python list, from Arrow in one pass (the group keys of GroupedSampler)."""
    return ds.select_columns([column]).with_format("arrow")[:][column].to_pylist()


class EpochSampler(torch.utils.data.Sampler, ABC):
    """A sampler whose order of each epoch is `order(epoch)`, a pure function of the seed and the epoch."""

    n: int
    seed: int
    epoch: int = 0

    @abstractmethod
    def order(self, epoch: int) -> list[int]:
        """The row indices of one epoch, in order."""

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1  # a fresh order each pass even where nobody calls set_epoch
        yield from self.order(epoch)


class ShuffledSampler(EpochSampler):
    """Plain shuffling; on one process exactly torch's RandomSampler order, and resumable.

    RandomSampler draws each epoch's permutation seed from torch's global generator when the epoch's
    first index is asked for. With `draw=True` this sampler does the same, at the same moment, so a
    seeded run meets the rows in the order it always did; the seeds drawn are kept in `seeds` (the
    checkpoint holds the running epoch's), so a resumed run recomputes that epoch's order instead
    of drawing a new one. Under DDP the ranks' generators part ways, so there (`draw=False`) the
    order is a function of (seed, epoch) alone, the same on every rank.
    """

    def __init__(self, n: int, seed: int = 0, draw: bool = True):
        self.n, self.seed, self.epoch, self.draw = n, seed, 0, draw
        self.seeds: dict[int, int] = {}

    def order(self, epoch: int) -> list[int]:
        if epoch not in self.seeds:
            self.seeds[epoch] = int(torch.empty((), dtype=torch.int64).random_().item()) if self.draw else self.seed * 1_000_003 + epoch
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seeds[epoch])).tolist()


class GroupedSampler(EpochSampler):
    """Shuffled indices in which rows of one group stay together and each batch holds rows of similar length.

    Each epoch: shuffle the groups (rows sharing a `groups` key; each row its own group without
    keys), cut them into chunks of about `chunk` batches, sort each chunk's groups by their longest
    row (longest first, stable, so no lengths means no sorting), cut the chunks into batches and
    shuffle the order of the batches. Rows meet in random company and order, as with plain
    shuffling, but a batch's rows share a width, and a prompt's pairs share a batch (a group longer
    than a batch, or one that straddles a chunk's batch edge, is split). In training, ResumableSampler
    deals these batches out whole to the ranks.
    """

    def __init__(self, batch_size: int, lengths: list[int] | None = None, groups: list | None = None, seed: int = 0, chunk: int = 32):
        if lengths is None and groups is None:
            raise ValueError("GroupedSampler needs row lengths, group keys or both")
        n = len(lengths if lengths is not None else groups)
        members: dict = {}
        for i, key in enumerate(groups if groups is not None else range(n)):
            members.setdefault(key, []).append(i)
        self.units = list(members.values())
        self.widths = [0] * len(self.units)
        if lengths is not None and self.units:  # each unit's longest row, in one pass over the rows laid out unit after unit
            starts = np.cumsum([0] + [len(unit) for unit in self.units[:-1]])
            self.widths = np.maximum.reduceat(np.asarray(lengths)[np.concatenate(self.units)], starts).tolist()
        self.n, self.batch_size, self.seed, self.chunk, self.epoch = n, batch_size, seed, chunk, 0

    def order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
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
        return [i for k in torch.randperm(len(full), generator=g).tolist() for i in full[k]] + rest  # short batches last, dropped by drop_last


class ResumableSampler(DistributedSampler):
    """One rank's share of an EpochSampler's order, in whole batches, able to start in the middle of an epoch.

    The epoch's order is cut into full batches (the short rest dropped, as drop_last would) and the
    batches are dealt out to the ranks in turn, so a batch's rows (of one width, a prompt's pairs)
    stay together on one rank. `resume(epoch, batches)` makes the next pass start after the first
    `batches` batches of that epoch (counted over all ranks), without loading them.

    It is a DistributedSampler so that Lightning leaves it alone under DDP: its DistributedSamplerWrapper
    would reshuffle our rows across ranks, and after a resume it would replay the first epoch's order,
    since it sets the epoch only after the first batch is drawn. Under one process it is the source's order.
    """

    def __init__(self, source: EpochSampler, batch_size: int, num_replicas: int = 1, rank: int = 0):
        super().__init__(range(len(source)), num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=True)
        self.source, self.batch_size, self.skip = source, batch_size, 0

    @property
    def batches_per_rank(self) -> int:
        return len(self.source) // self.batch_size // self.num_replicas

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def resume(self, epoch: int, batches: int) -> None:
        self.epoch, self.skip = epoch, batches

    def __iter__(self):
        order = self.source.order(self.epoch)
        skip, self.skip = self.skip, 0
        total = len(order) // self.batch_size
        for k in range((total - skip) // self.num_replicas):
            b = skip + k * self.num_replicas + self.rank
            yield from order[b * self.batch_size : (b + 1) * self.batch_size]
