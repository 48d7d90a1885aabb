"""Streaming (X0, X1, prompt) triples from a generated dataset (local folder or object-store URL) with litdata.

The batch format (:class:`TripleBatch`), the decoding of a stored record, the checks of a local dataset and the
DataModule. Reading a dataset on object storage is :mod:`instaflow_pl.data.remote`; the fixed litdata loader is
:mod:`instaflow_pl.data.litdata_compat`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from instaflow_pl.conventions import noise_from_seed
from instaflow_pl.data.litdata_compat import resumable_loader_class
from instaflow_pl.data.manifest import MANIFEST_FILE, Manifest
from instaflow_pl.data.remote import is_url, read_remote_manifest
from instaflow_pl.data.store import INDEX_FILE, commit_record, decode_tensor, tail_sha256
from instaflow_pl.data.triples_memory import (
    IN_MEMORY_MB,
    TripleTable,
    in_memory_dataset_class,
    read_table,
    table_megabytes,
)
from instaflow_pl.errors import UserError
from instaflow_pl.ranks import setup_on_every_rank


@dataclass
class TripleBatch:
    """A batch of training triples.

    Attributes:
        x0: Noise, (B, C, H, W), float32; None for data without pairs (a 1-RF draws fresh noise).
        x1: The teacher's output for that noise and prompt, (B, C, H, W), float32.
        prompts: The B prompts.
        index: Sample indices in the dataset, (B,).
    """

    x0: torch.Tensor | None
    x1: torch.Tensor
    prompts: list[str]
    index: torch.Tensor

    def __len__(self) -> int:
        return self.x1.shape[0]

    def to(self, device: torch.device | str) -> TripleBatch:
        """The batch on ``device``: itself when every tensor is already there (no copy of the dataclass)."""
        device = torch.device(device)
        tensors = (self.x0, self.x1, self.index)
        if all(t is None or _same_device(t.device, device) for t in tensors):
            return self
        x0, x1, index = (None if t is None else t.to(device, non_blocking=True) for t in tensors)
        return dataclasses.replace(self, x0=x0, x1=x1, index=index)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


NOISE_CACHE_MB = 8
"""A dataset whose regenerated X0 take at most this many MB keeps them (per decoder, i.e. per data-loader worker):
its noises are drawn once, not every epoch (the digits demo's 20000 pairs: 5 MB; a seeded draw costs about 10 us per
sample). Larger datasets keep none, so streaming memory stays flat in the dataset's size."""


class TripleDecoder:
    """Turns a stored record into float32 (x0, x1): X0 is regenerated from its seed unless it was stored.

    Regenerated noises are kept by seed when all of the dataset's fit in ``NOISE_CACHE_MB`` (the same tensors, so
    nothing changes but the time); a larger dataset draws each one every time.

    Args:
        manifest: The dataset's manifest (latent shape, storage dtype).
    """

    def __init__(self, manifest: Manifest):
        self.latent_shape = tuple(manifest.latent_shape)
        self.dtype = manifest.x1_dtype
        self._noise: dict[int, torch.Tensor] = {}
        fits = int(manifest.count) * 4 * math.prod(self.latent_shape) <= NOISE_CACHE_MB * 2**20
        self._noise_room = int(manifest.count) if fits else 0

    def noise(self, seed: int) -> torch.Tensor:
        """The X0 of a sample's seed (:func:`~instaflow_pl.conventions.noise_from_seed`), from the cache if drawn."""
        seed = int(seed)
        x0 = self._noise.get(seed)
        if x0 is None:
            x0 = noise_from_seed(seed, self.latent_shape)
            if len(self._noise) < self._noise_room:
                self._noise[seed] = x0
        return x0

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """Decode one record."""
        if "x0" in item:
            x0 = decode_tensor(item["x0"], self.dtype).float()
        else:
            x0 = self.noise(item["seed"])
        x1 = decode_tensor(item["x1"], self.dtype).float()
        return {"index": item["index"], "prompt": item["prompt"], "x0": x0, "x1": x1}


def collate_triples(items: list[dict[str, Any]]) -> TripleBatch:
    """Stack decoded records into a :class:`TripleBatch`."""
    return TripleBatch(
        x0=torch.stack([it["x0"] for it in items]),
        x1=torch.stack([it["x1"] for it in items]),
        prompts=[it["prompt"] for it in items],
        index=torch.tensor([int(it["index"]) for it in items]),
    )


def collate_rows(table: TripleTable, rows: list[int]) -> TripleBatch:
    """The :class:`TripleBatch` of these rows of a dataset held in memory (its loader's ``collate_fn``, bound to
    the table)."""
    at = torch.as_tensor(rows, dtype=torch.long)
    return TripleBatch(
        x0=table.x0[at], x1=table.x1[at], prompts=[table.prompts[r] for r in rows], index=table.index[at]
    )


def read_manifest(path: str) -> Manifest:
    """The manifest of a dataset folder or URL."""
    if is_url(path):
        return read_remote_manifest(path)
    return Manifest.read(Path(path).expanduser() / MANIFEST_FILE)


def check_local_dataset(root: Path) -> None:
    """Fail with one line naming the file if the index is missing, or a shard is missing, truncated, or not the one
    written for this dataset (the SHA-256 of its last 4 KiB differs from its commit record: a shard copied from
    another dataset, or changed since)."""
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise UserError(
            f"{root} has no {INDEX_FILE}: generation has not finished; rerun the same pairs command to complete it"
        )
    for chunk in json.loads(index_path.read_text())["chunks"]:
        shard = root / chunk["filename"]
        if not shard.is_file():
            raise UserError(f"shard {shard} is missing; restore it or regenerate the dataset")
        if shard.stat().st_size != chunk["chunk_bytes"]:
            raise UserError(
                f"shard {shard} is corrupt ({shard.stat().st_size} bytes, index says {chunk['chunk_bytes']}); "
                "regenerate the dataset"
            )
        record = commit_record(root, chunk["filename"])
        if record is not None and "tail_sha256" in record and tail_sha256(shard) != record["tail_sha256"]:
            raise UserError(
                f"shard {shard} does not belong to this dataset: its bytes differ from the ones recorded when it was "
                "written (a shard of another dataset, or a changed file); put the original back or regenerate the "
                "dataset"
            )


class TriplesDataModule(L.LightningDataModule):
    """Streams a generated triples dataset for reflow or distillation.

    The position in the stream is part of every Lightning checkpoint (litdata's ``StreamingDataLoader`` state), so a
    resumed fit continues from the exact sample it stopped at. A small local dataset is decoded into memory once and
    its batches gathered from there (:mod:`instaflow_pl.data.triples_memory`): the same samples in the same order,
    the same resume state, without litdata's ~60 us per sample read.

    Args:
        path: Dataset folder, or an object-store URL (``s3://bucket/prefix``, ``gs://...``) litdata can stream.
        batch_size: Triples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of the samples (taken from the end) held out for validation.
        shuffle: Shuffle the training stream (litdata shuffles shards, then samples within a window).
        seed: Seed of the shuffle.
        drop_last: Drop the last incomplete training batch. With several ranks (DDP) it is always on, so every rank
            takes the same number of steps (litdata's rule; the left-over samples differ each epoch when shuffling).
        cache_dir: Local cache for remote datasets.
        expected_latent_shape: If set, refuse a dataset whose latents have another (C, H, W).
        in_memory: Hold the decoded dataset in memory (True), stream every sample from its shards (False), or decide
            (None): in memory when the dataset is local and its float32 X0 and X1 take at most ``IN_MEMORY_MB``
            (256 MB). Either way the batches, their order and the resume state are the same.
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        cache_dir: str | None = None,
        expected_latent_shape: list[int] | None = None,
        in_memory: bool | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(
                f"data.batch_size must be >= 1, got {batch_size}; set data.init_args.batch_size to 1 or more"
            )
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.path = str(path)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.cache_dir = cache_dir
        self.expected_latent_shape = expected_latent_shape
        self.in_memory = in_memory
        self.manifest: Manifest | None = None
        self.table: TripleTable | None = None
        self._train = None
        self._val = None
        self._val_batch_size = batch_size

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def _holds_in_memory(self) -> bool:
        if self.in_memory is not None:
            return self.in_memory
        return not is_url(self.path) and table_megabytes(self.manifest) <= IN_MEMORY_MB

    def _dataset(self, shuffle: bool, rows: bool = False):
        """The stream of decoded samples, or (``rows``) of their global indices, rows of :attr:`table`."""
        from litdata import StreamingDataset

        # Several ranks must take the same number of training steps (each step is a collective).
        drop_last = self.drop_last or self._world_size() > 1
        dataset_class = in_memory_dataset_class() if rows else StreamingDataset
        return dataset_class(
            self.path if is_url(self.path) else str(Path(self.path).expanduser()),
            cache_dir=self.cache_dir,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=drop_last if shuffle else False,
            transform=None if rows else TripleDecoder(self.manifest),
            # litdata's "auto" batch decoding re-decodes many neighbours per item read when shuffling (measured:
            # 28 decodes per sample); one decode per sample is 3-8x faster and gives the same order and data.
            batch_decode=False,
        )

    @setup_on_every_rank
    def setup(self, stage: str | None = None) -> None:
        """Read and check the manifest and shards; build the train and val streams."""
        if self._train is not None:
            return
        self.manifest = read_manifest(self.path)
        if self.expected_latent_shape is not None and list(self.expected_latent_shape) != list(
            self.manifest.latent_shape
        ):
            raise UserError(
                f"triples in {self.path} have latent shape {self.manifest.latent_shape}, "
                f"but the model expects {list(self.expected_latent_shape)}; generate pairs at the model's shape"
            )
        if not is_url(self.path):
            check_local_dataset(Path(self.path).expanduser())
        rows = self._holds_in_memory()
        if rows:
            self.table = read_table(self._dataset(shuffle=False))
        if self.val_fraction > 0:
            from litdata import train_test_split

            train, val = train_test_split(
                self._dataset(self.shuffle, rows), [1.0 - self.val_fraction, self.val_fraction], shuffle=False
            )
            val.set_drop_last(False)  # every held-out sample counts; uneven val batches across ranks are fine
            # The same samples in the same order at every validation (and after a resume): with limit_val_batches,
            # a shuffled stream would score another subset each time.
            val.set_shuffle(False)
            self._train, self._val = train, val
            self._val_batch_size = self._rank_safe_val_batch_size(
                sum(end - start for start, end in val.region_of_interest)
            )
        else:
            self._train = self._dataset(self.shuffle, rows)

    def _rank_safe_val_batch_size(self, count: int) -> int:
        """A validation batch size that gives every rank at least one batch.

        litdata hands each rank ``count // batch_size // world`` whole batches and the remainder to the last rank, so
        a split smaller than ``batch_size * world`` would leave a rank without validation batches; that rank would
        then skip validation while the others wait for it in the metric reduction (``sync_dist``). Batch size does
        not change the numbers: the logged means are weighted by batch size.
        """
        world, count = self._world_size(), int(count)
        if world <= 1 or count == 0:
            return self.batch_size
        if count < world:
            raise UserError(
                f"the validation split of {self.path} has {count} samples, fewer than the {world} ranks, so some rank "
                "would have nothing to validate; raise data.val_fraction or set it to 0"
            )
        return max(1, min(self.batch_size, count // world))

    def _loader(self, dataset, batch_size: int | None = None):
        return resumable_loader_class()(
            dataset,
            batch_size=batch_size or self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_triples if self.table is None else functools.partial(collate_rows, self.table),
        )

    def train_dataloader(self):
        """The training stream (resumable)."""
        return self._loader(self._train)

    def val_dataloader(self):
        """The held-out stream (empty list when ``val_fraction`` is 0)."""
        return self._loader(self._val, self._val_batch_size) if self._val is not None else []
