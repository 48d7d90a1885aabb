"""A small triples dataset held in memory and read in litdata's order: the same batches, faster.

litdata reads a stored sample in about 60 us of Python (chunk lookup, header, deserialisation), 15 ms for a batch of
256: more than half of a digits distillation step on this machine. A dataset that fits in memory is decoded once
into one table (:class:`TripleTable`), and :func:`in_memory_dataset_class` gives a ``StreamingDataset`` whose items
are row numbers instead of stored records. Everything that decides which sample comes when (shuffle, epochs, the
split into train and validation, ranks, workers, the resume state in checkpoints) is still litdata's own, so a fit
sees the same samples in the same order and resumes at the same sample as when streaming; the collate function
(:func:`~instaflow_pl.data.triples.collate_rows`) gathers the batch's rows from the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from instaflow_pl.data.manifest import Manifest

IN_MEMORY_MB = 256
"""A local dataset whose float32 X0 and X1 take at most this many MB is held in memory (``in_memory=None``)."""


def table_megabytes(manifest: Manifest) -> float:
    """MB that a dataset's float32 X0 and X1 take in memory."""
    return 2 * 4 * int(manifest.count) * math.prod(manifest.latent_shape) / 2**20


@dataclass
class TripleTable:
    """Every decoded sample of a dataset, row ``i`` being the dataset's ``i``-th stored sample.

    Attributes:
        x0: Noises, (N, C, H, W), float32.
        x1: Teacher outputs, (N, C, H, W), float32.
        prompts: The N prompts.
        index: The samples' own indices (their ``index`` field), (N,).
    """

    x0: torch.Tensor
    x1: torch.Tensor
    prompts: list[str]
    index: torch.Tensor

    def __len__(self) -> int:
        return self.x1.shape[0]


def read_table(dataset: Any) -> TripleTable:
    """Decode every sample of an unsplit, unshuffled ``StreamingDataset`` whose transform is a
    :class:`~instaflow_pl.data.triples.TripleDecoder` (its ``i``-th item is the stored sample with global index ``i``,
    the number litdata's iteration hands to ``__getitem__``)."""
    from litdata.utilities.dataset_utilities import load_index_file
    from tqdm.auto import tqdm

    # every stored sample: under DDP len(dataset) is this rank's share, but an int index reaches the whole dataset
    count = sum(chunk["chunk_size"] for chunk in load_index_file(dataset.input_dir.path)["chunks"])
    items = (dataset[i] for i in range(count))
    items = tqdm(items, total=count, desc="reading triples into memory", unit="sample", disable=count < 100_000)
    x0, x1, prompts, index = [], [], [], []
    for item in items:
        x0.append(item["x0"])
        x1.append(item["x1"])
        prompts.append(item["prompt"])
        index.append(int(item["index"]))
    return TripleTable(x0=torch.stack(x0), x1=torch.stack(x1), prompts=prompts, index=torch.tensor(index))


def in_memory_dataset_class() -> type:
    """litdata's ``StreamingDataset`` whose iteration yields rows of a :class:`TripleTable` (the visited samples'
    global indices) instead of reading the stored samples (built on call, so litdata loads only when needed)."""
    from litdata import StreamingDataset
    from litdata.streaming.sampler import ChunkedIndex
    from litdata.utilities.dataset_utilities import load_index_file

    class RowStreamingDataset(StreamingDataset):
        """Yields the global index of each sample litdata's iteration visits; indexing by an int still reads the
        stored sample.

        litdata numbers a split's samples over the split's own chunks (the validation split's first chunk starts at
        0), so the row is the chunk's first sample in the whole dataset plus the sample's offset in its chunk.
        """

        _row_files: list[str] | None = None
        _row_offsets: list[int] = []

        def _offsets(self) -> list[int]:
            if self._row_files is not self.subsampled_files:  # set anew by litdata's train_test_split
                chunks = load_index_file(self.input_dir.path)["chunks"]
                starts, start = {}, 0
                for chunk in chunks:
                    starts[chunk["filename"]], start = start, start + chunk["chunk_size"]
                sizes = {chunk["filename"]: chunk["chunk_size"] for chunk in chunks}
                offsets, split_start = [], 0
                for filename in self.subsampled_files:
                    offsets.append(starts[filename] - split_start)
                    split_start += sizes[filename]
                self._row_files, self._row_offsets = self.subsampled_files, offsets
            return self._row_offsets

        def __getitem__(self, index: Any) -> Any:
            if isinstance(index, ChunkedIndex):
                return int(index.index) + self._offsets()[index.chunk_index]
            return super().__getitem__(index)

    return RowStreamingDataset
