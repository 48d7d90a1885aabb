"""The writer of a sharded predict run: buffers each rank's predictions per unit of work and commits whole units."""

from __future__ import annotations

import time
import warnings
from collections.abc import Hashable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm.auto import tqdm

from instaflow_pl.errors import UserError

# Micro-batches come from an IterableDataset; the writer does not need Lightning's batch indices.
warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")


class ShardWriter(BasePredictionWriter):
    """Collects a rank's predictions per unit of work and commits each unit as soon as it is whole; shows progress.

    It writes for a :class:`~instaflow_pl.predict.module.ShardedPredict` module (which adds it itself).

    A prediction is anything with the sample ``indices`` it covers, within one unit; the module names its unit
    (``unit_key``) and commits a whole one (``commit_unit``). Once every rank is done, rank 0 completes the run
    (``complete``). On an error the progress bar is closed, so the error is printed on a line of its own.
    """

    def __init__(self):
        super().__init__(write_interval="batch")
        self._pending: dict[Hashable, list[Any]] = {}
        self._bar: tqdm | None = None
        self._start = 0.0
        self._samples = 0

    def on_predict_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Open the progress bar (rank 0) over the samples this rank computes."""
        total = sum(len(samples) for _, samples in pl_module.work_units())
        self._start, self._samples = time.perf_counter(), 0
        if trainer.is_global_zero and total:
            self._bar = tqdm(
                total=total, desc=pl_module.progress_label, unit=pl_module.progress_unit, dynamic_ncols=True
            )

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: Any,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Buffer the prediction; commit its unit when the unit is whole."""
        key = pl_module.unit_key(prediction)
        parts = self._pending.setdefault(key, [])
        parts.append(prediction)
        if sum(len(part.indices) for part in parts) == len(pl_module.store.unit_range(key)):
            parts = sorted(self._pending.pop(key), key=lambda part: part.indices[0])
            try:
                pl_module.commit_unit(key, parts)
            except ValueError as err:
                raise UserError(str(err)) from None
        self._samples += len(prediction.indices)
        if self._bar is not None:
            self._bar.update(len(prediction.indices))

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Close the progress bar, so the error is printed on a line of its own."""
        self._close()

    def on_predict_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        """Wait for every rank, then complete the run on rank 0."""
        self._close()
        if self._pending:
            raise RuntimeError(f"shards {sorted(self._pending)} were left incomplete; rerun to finish them")
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            pl_module.complete(self._samples, time.perf_counter() - self._start)
