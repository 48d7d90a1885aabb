"""The LightningModule base of a sharded predict run (pair generation, evaluation) under ``Trainer.predict``."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

import lightning as L

from instaflow_pl.predict.store import ShardedFolder
from instaflow_pl.predict.work import WorkUnit, round_robin
from instaflow_pl.predict.writer import ShardWriter
from instaflow_pl.ranks import rank_zero_first, setup_on_every_rank


def _nothing(_: Any) -> None:
    return None


class ShardedPredict(L.LightningModule):
    """A ``Trainer.predict`` run whose results are committed one unit of work (a shard) at a time, so it resumes.

    At setup, rank 0 opens the output folder (creates it, or checks that it holds the same settings) while the other
    ranks wait, and an error there ends every rank with its one line; then each rank takes the pending units
    round-robin and computes whole units. A :class:`~instaflow_pl.predict.writer.ShardWriter` commits each unit as
    soon as it is whole, and once every rank is done rank 0 completes the run. A rerun of the same command computes
    only the units that were not committed.

    Subclasses make the folder (:meth:`make_store`), predict micro-batches that carry their sample ``indices``,
    name a prediction's unit (:meth:`unit_key`), commit a whole unit (:meth:`commit_unit`) and complete the run
    (:meth:`complete`).
    """

    progress_label: ClassVar[str] = "predict"
    """Label of the progress bar."""

    progress_unit: ClassVar[str] = "sample"
    """What the progress bar counts."""

    def __init__(self):
        super().__init__()
        self.store: Any = None
        self._units: list[WorkUnit] = []

    def make_store(self, datamodule: L.LightningDataModule | None) -> ShardedFolder:
        """The output folder for the data ``datamodule`` serves (on every rank; nothing is written yet)."""
        raise NotImplementedError

    def open_on_rank_zero(self) -> None:
        """Work done once, by rank 0, while the other ranks wait: open the folder."""
        self.store.open()

    def opened(self, pending: Sequence[Hashable]) -> None:
        """On every rank once the folder is open: say what is done and what is resumed."""

    def unit_key(self, prediction: Any) -> Hashable:
        """The unit of work a prediction belongs to."""
        raise NotImplementedError

    def commit_unit(self, key: Hashable, parts: list[Any]) -> None:
        """Commit unit ``key`` from its predictions (in sample order)."""
        raise NotImplementedError

    def complete(self, samples: int, seconds: float) -> None:
        """On rank 0 once every rank has committed its units; ``samples`` were computed here in ``seconds``."""

    @setup_on_every_rank
    def setup(self, stage: str) -> None:
        """Open (or resume) the output folder on rank 0, then decide which units this rank computes."""
        self.store = self.make_store(self.trainer.datamodule)
        rank_zero_first(lambda: (self.open_on_rank_zero(), None), _nothing, f"{type(self).__name__}.setup")
        pending = self.store.pending_units()
        mine = round_robin(pending, self.trainer.global_rank, self.trainer.world_size)
        self._units = [(key, self.store.unit_range(key)) for key in mine]
        self.opened(pending)

    def work_units(self) -> list[WorkUnit]:
        """The units (key, sample range) this rank computes; the datamodule serves their micro-batches."""
        return self._units

    def configure_callbacks(self) -> list[L.Callback]:
        """A sharded predict run always writes through a :class:`~instaflow_pl.predict.writer.ShardWriter`."""
        return [ShardWriter()]
