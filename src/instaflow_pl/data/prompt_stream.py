"""The DataModule that feeds prompts to pair generation under ``Trainer.predict``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import lightning as L
from torch.utils.data import DataLoader

from instaflow_pl.data.prompts import load_prompts
from instaflow_pl.errors import UserError
from instaflow_pl.predict.work import WorkBatches
from instaflow_pl.ranks import setup_on_every_rank


@dataclass
class PromptBatch:
    """A micro-batch of prompts with their sample indices (never crossing a unit of work, e.g. a shard)."""

    indices: list[int]
    prompts: list[str]


class _PromptWork(WorkBatches[PromptBatch]):
    """Micro-batches of prompts over given index ranges; DataLoader workers take every n-th one."""

    def __init__(self, prompts: Sequence[str], ranges: Sequence[range], batch_size: int):
        super().__init__([(None, r) for r in ranges], batch_size)
        self.prompts = prompts

    def batch(self, key: None, indices: list[int]) -> PromptBatch:
        """The prompts of samples ``indices``."""
        return PromptBatch(indices, [self.prompts[i] for i in indices])


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
