"""The DataModule that feeds prompts to pair generation under ``Trainer.predict``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from instaflow_pl.data.prompts import load_prompts
from instaflow_pl.errors import UserError
from instaflow_pl.ranks import setup_on_every_rank


@dataclass
class PromptBatch:
    """A micro-batch of prompts with their sample indices (never crossing a unit of work, e.g. a shard)."""

    indices: list[int]
    prompts: list[str]


class _PromptWork(IterableDataset):
    """Micro-batches over given index ranges; DataLoader workers take every n-th one."""

    def __init__(self, prompts: Sequence[str], ranges: Sequence[range], batch_size: int):
        self.prompts = prompts
        self.batches = [
            range(start, min(start + batch_size, r.stop))
            for r in ranges
            for start in range(r.start, r.stop, batch_size)
        ]

    def __iter__(self) -> Iterator[PromptBatch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for batch in self.batches[worker::workers]:
            yield PromptBatch(list(batch), [self.prompts[i] for i in batch])


class PromptDataModule(L.LightningDataModule):
    """Prompts from a file, served in micro-batches for pair generation.

    The LightningModule decides which samples this rank generates by offering ``work_ranges(count) -> list[range]``
    (pair generation gives whole shards, round-robin over ranks); micro-batches never cross a range.

    Args:
        prompts: Prompt file: .txt (one per line), .jsonl, .parquet or a COCO captions .json.
        format: ``auto`` (from the extension) or ``txt``, ``jsonl``, ``parquet``, ``coco``.
        column: Field holding the prompt in JSONL and parquet files.
        limit: Use at most this many prompts (null: all).
        repeats: Generate this many samples per prompt (each with its own noise).
        batch_size: Prompts per teacher call.
        num_workers: DataLoader workers (prompt batching is cheap; 0 is usually right).
    """

    def __init__(
        self,
        prompts: str,
        format: str = "auto",
        column: str = "prompt",
        limit: int | None = None,
        repeats: int = 1,
        batch_size: int = 16,
        num_workers: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(
                f"data.batch_size must be >= 1, got {batch_size}; set data.init_args.batch_size to 1 or more"
            )
        self.source = prompts
        self.format = format
        self.column = column
        self.limit = limit
        self.repeats = repeats
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.prompts: list[str] = []

    @setup_on_every_rank
    def setup(self, stage: str | None = None) -> None:
        """Read the prompt file."""
        if not self.prompts:
            self.prompts = load_prompts(self.source, self.format, self.column, self.limit, self.repeats)

    def predict_dataloader(self) -> DataLoader:
        """Micro-batches of this rank's work."""
        module = self.trainer.lightning_module if self.trainer else None
        if module is not None and hasattr(module, "work_ranges"):
            ranges = module.work_ranges(len(self.prompts))
        else:
            ranges = [range(len(self.prompts))]
        work = _PromptWork(self.prompts, ranges, self.batch_size)
        return DataLoader(work, batch_size=None, num_workers=self.num_workers)
