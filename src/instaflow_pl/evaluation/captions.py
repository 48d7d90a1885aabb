"""The captions an evaluation samples from, served as work units (row, shard) under ``Trainer.predict``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader

from instaflow_pl.data.prompts import FORMATS, coco_captions_per_image, load_prompts
from instaflow_pl.errors import UserError
from instaflow_pl.predict.work import WorkBatches


@dataclass
class CaptionBatch:
    """A micro-batch of one row's work: sample indices and their captions (never crossing a shard).

    Attributes:
        row: Index of the report row (model, steps, guidance).
        indices: Sample indices.
        captions: Their captions.
    """

    row: int
    indices: list[int]
    captions: list[str]


def load_captions(path: str | Path, format: str = "auto", column: str = "prompt") -> list[str]:
    """Captions of an evaluation: a COCO captions file gives one per image (see
    :func:`~instaflow_pl.data.prompts.coco_captions_per_image`); txt, jsonl and parquet files give one per line/row."""
    path = Path(path).expanduser()
    if format == "coco" or (format == "auto" and path.suffix.lower() == ".json"):
        captions = coco_captions_per_image(path)
        if not captions:
            raise UserError(f"COCO captions file {path} holds no captions")
        return captions
    if not path.is_file():
        raise UserError(f"captions file not found: {path}; check the path (data.init_args.captions)")
    return load_prompts(path, format, column)


class _Work(WorkBatches[CaptionBatch]):
    """Micro-batches of captions over units ((row, shard), samples)."""

    def __init__(self, captions: Sequence[str], units: Sequence[tuple[tuple[int, int], range]], batch_size: int):
        super().__init__(units, batch_size)
        self.captions = captions

    def batch(self, key: tuple[int, int], indices: list[int]) -> CaptionBatch:
        """The captions of samples ``indices`` of the unit's row."""
        return CaptionBatch(key[0], indices, [self.captions[i] for i in indices])


class CaptionDataModule(L.LightningDataModule):
    """The first ``num_samples`` captions of a file, in micro-batches over the evaluation's pending shards.

    Sample i of every row is generated from caption i and the noise of ``seed + i``, so rows differ only by their model.

    Args:
        captions: A COCO captions file (``captions_val2017.json``: one caption per image, images in increasing image id
            order, each image's first caption, i.e. the one with the lowest annotation id), or a .txt (one caption a
            line), .jsonl or .parquet file.
        num_samples: Samples per row (5000 for FID-5k, 30000 for FID-30k): the first captions of the file.
        format: ``auto`` (from the extension; .json is COCO) or one of ``txt``, ``jsonl``, ``parquet``, ``coco``.
        column: Field holding the caption in JSONL and parquet files.
        batch_size: Images per model call (also the batch of the speed measurement).
    """

    def __init__(
        self,
        captions: str,
        num_samples: int = 5000,
        format: str = "auto",
        column: str = "prompt",
        batch_size: int = 16,
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"data.batch_size must be >= 1, got {batch_size}; set data.init_args.batch_size")
        if num_samples < 2:
            raise UserError(f"data.num_samples must be >= 2 (FID needs two images), got {num_samples}")
        if format != "auto" and format not in FORMATS:
            raise UserError(f"unknown captions format {format!r}: choose auto or one of {', '.join(FORMATS)}")
        self.source = captions
        self.num_samples = num_samples
        self.format = format
        self.column = column
        self.batch_size = batch_size
        self.captions: list[str] = []

    def setup(self, stage: str | None = None) -> None:
        """Read the captions and keep the first ``num_samples``."""
        if self.captions:
            return
        captions = load_captions(self.source, self.format, self.column)
        if self.num_samples > len(captions):
            raise UserError(
                f"num_samples {self.num_samples} is more than the {len(captions)} captions in {self.source}; lower "
                "data.init_args.num_samples or give a larger captions file"
            )
        self.captions = captions[: self.num_samples]

    def predict_dataloader(self) -> DataLoader:
        """Micro-batches of this rank's shards (the module decides which: ``work_units()``)."""
        module = self.trainer.lightning_module if self.trainer else None
        units = module.work_units() if module is not None and hasattr(module, "work_units") else []
        return DataLoader(_Work(self.captions, units, self.batch_size), batch_size=None)
