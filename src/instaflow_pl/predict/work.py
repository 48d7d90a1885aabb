"""Units of work of a sharded predict run: shard arithmetic, the split over ranks, and the micro-batches of a rank.

A run's samples are cut into shards of ``shard_size`` consecutive indices (the last may hold fewer); a unit of work is
one shard, named by a key (the shard, or a (row, shard) pair) together with its sample range. Each rank computes whole
units, so a unit is committed by the one process that computed it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from typing import Generic, TypeVar

from torch.utils.data import IterableDataset, get_worker_info

T = TypeVar("T")
Batch = TypeVar("Batch")

WorkUnit = tuple[Hashable, range]
"""A unit of work: its key and the sample indices it covers."""


def shard_count(count: int, shard_size: int) -> int:
    """Shards ``count`` samples are cut into."""
    return -(-count // shard_size)


def shard_range(shard: int, shard_size: int, count: int) -> range:
    """Sample indices of ``shard`` when ``count`` samples are cut into shards of ``shard_size``."""
    return range(shard * shard_size, min((shard + 1) * shard_size, count))


def round_robin(units: Sequence[T], rank: int, world: int) -> list[T]:
    """The units ``rank`` of ``world`` takes: the j-th one goes to rank ``j % world``."""
    return list(units[rank::world])


class WorkBatches(IterableDataset, Generic[Batch]):
    """Micro-batches of at most ``batch_size`` samples over units of work, never crossing a unit.

    DataLoader workers take every n-th micro-batch. Subclasses say what a micro-batch holds (:meth:`batch`).

    Args:
        units: The units of work, in order.
        batch_size: Samples per micro-batch.
    """

    def __init__(self, units: Sequence[WorkUnit], batch_size: int):
        self.batches = [
            (key, range(start, min(start + batch_size, samples.stop)))
            for key, samples in units
            for start in range(samples.start, samples.stop, batch_size)
        ]

    def batch(self, key: Hashable, indices: list[int]) -> Batch:
        """The micro-batch of samples ``indices`` of unit ``key``."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for key, indices in self.batches[worker::workers]:
            yield self.batch(key, list(indices))
