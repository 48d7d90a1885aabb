"""Writing a triples dataset as litdata shards, one shard at a time, so generation can resume after any crash.

Layout of a dataset folder::

    manifest.json            what produced the data (written first)
    shard-000000.bin ...     litdata chunks; shard k holds samples [k * shard_size, (k + 1) * shard_size)
    .progress/shard-k.json   commit record of shard k (its litdata chunk entry, size, SHA-256 of the whole file and
                             of its last 4 KiB); written last, atomically
    index.json               litdata index over all shards, written once every shard is committed

A shard counts as done only once its commit record exists, so a partly written shard is never counted; a rerun
regenerates it. Everything is written to a temporary name and moved into place, so a kill at any point leaves either
the old state or the new one. A write that fails (a full disk, a folder turned read-only) stops the run with one line
and leaves the same resumable state as a kill. The tail hash lets a reader notice, cheaply, a shard file that was
swapped for another dataset's (X1 is the last field of every record, so the tail is teacher output).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from instaflow_pl.data.manifest import MANIFEST_FILE, Manifest
from instaflow_pl.dtypes import DTYPES
from instaflow_pl.errors import UserError
from instaflow_pl.faults import CRASH_ENV, crashpoint
from instaflow_pl.fileio import atomic_write_text, remove_stale_temporaries
from instaflow_pl.predict.store import ShardedFolder

__all__ = [
    "CRASH_ENV",
    "INDEX_FILE",
    "PairRecord",
    "PairStore",
    "STORAGE_DTYPES",
    "commit_record",
    "shard_name",
    "tail_sha256",
]

INDEX_FILE = "index.json"
_PROGRESS = ".progress"
_TMP = ".tmp"
STORAGE_DTYPES = DTYPES
"""Storage dtypes of X1 (and of X0 when stored), by name."""


def encode_tensor(x: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """``x`` in storage dtype; bf16 is stored as its int16 bit pattern (litdata cannot serialise bf16)."""
    x = x.detach().to("cpu", STORAGE_DTYPES[dtype_name]).contiguous()
    return x.view(torch.int16) if dtype_name == "bf16" else x


def decode_tensor(x: torch.Tensor, dtype_name: str) -> torch.Tensor:
    """Inverse of :func:`encode_tensor`: the stored tensor in its storage dtype."""
    return x.view(torch.bfloat16) if dtype_name == "bf16" else x


@dataclass
class PairRecord:
    """One generated sample before it is written.

    Attributes:
        index: Sample index in the dataset.
        seed: The seed its noise X0 was drawn from.
        prompt: The prompt.
        x1: The teacher's output, (C, H, W).
        x0: The noise, (C, H, W); stored only when the manifest asks for tensors.
    """

    index: int
    seed: int
    prompt: str
    x1: torch.Tensor
    x0: torch.Tensor | None = None


TAIL_BYTES = 4096
"""Bytes at the end of a shard whose SHA-256 its commit record keeps (``tail_sha256``)."""


def shard_name(shard: int) -> str:
    """File name of shard ``shard``."""
    return f"shard-{shard:06d}.bin"


def tail_sha256(path: Path, size: int | None = None) -> str:
    """SHA-256 of the last ``TAIL_BYTES`` of a file (of ``size`` bytes, if known)."""
    size = path.stat().st_size if size is None else size
    with path.open("rb") as handle:
        handle.seek(max(size - TAIL_BYTES, 0))
        return hashlib.sha256(handle.read(TAIL_BYTES)).hexdigest()


def commit_record(root: Path, shard_file: str) -> dict | None:
    """The commit record of shard file ``shard_file`` in the dataset folder ``root``; None if it has none."""
    try:
        return json.loads((Path(root) / _PROGRESS / f"{Path(shard_file).stem}.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


class PairStore(ShardedFolder):
    """A dataset folder being generated (see the module docstring for its layout).

    Args:
        root: The dataset folder.
        manifest: What the folder holds (or will hold).
    """

    record_file = MANIFEST_FILE
    folder_name = "output folder"

    def __init__(self, root: str | Path, manifest: Manifest):
        super().__init__(root)
        self.manifest = manifest

    def record_text(self) -> str:
        """The manifest file's text."""
        return self.manifest.to_json()

    def differences(self, path: Path) -> list[str]:
        """How the manifest at ``path`` differs from this one."""
        return Manifest.read(path).differences(self.manifest)

    def refusal(self, differences: list[str]) -> str:
        """The line that refuses a folder holding another dataset."""
        return (
            f"{self.root} already holds a different dataset ({'; '.join(differences)}); "
            "use a new output folder, or restore the original settings to resume"
        )

    def prepare(self) -> None:
        """Create the commit records' folder; clear leftovers of interrupted writes."""
        (self.root / _PROGRESS).mkdir(exist_ok=True)
        shutil.rmtree(self.root / _TMP, ignore_errors=True)
        remove_stale_temporaries(self.root / _PROGRESS)

    def is_complete(self) -> bool:
        """Whether every shard is committed and the index is written."""
        return (self.root / INDEX_FILE).is_file()

    def done_shards(self) -> set[int]:
        """Shards whose commit record exists and whose file has the recorded size."""
        done = set()
        for record_path in (self.root / _PROGRESS).glob("shard-*.json"):
            try:
                record = json.loads(record_path.read_text())
            except json.JSONDecodeError:
                continue
            shard_file = self.root / record["chunk"]["filename"]
            if shard_file.is_file() and shard_file.stat().st_size == record["bytes"]:
                done.add(int(record["shard"]))
        return done

    def pending_shards(self) -> list[int]:
        """Shards still to generate, in order."""
        done = self.done_shards()
        return [k for k in range(self.manifest.num_shards) if k not in done]

    def pending_units(self) -> list[int]:
        """Shards still to generate; none once the dataset is complete."""
        return [] if self.is_complete() else self.pending_shards()

    def unit_range(self, key: int) -> range:
        """Sample indices of shard ``key``."""
        return self.manifest.shard_range(key)

    def _to_item(self, record: PairRecord) -> dict:
        dtype = self.manifest.x1_dtype
        item = {"index": record.index, "seed": record.seed, "prompt": record.prompt}
        if self.manifest.x0_format == "tensor":
            if record.x0 is None:
                raise ValueError(f"sample {record.index} has no x0 but the manifest stores X0 as tensors")
            item["x0"] = encode_tensor(record.x0, dtype)
        item["x1"] = encode_tensor(record.x1, dtype)
        return item

    def write_shard(self, shard: int, records: Sequence[PairRecord]) -> Path:
        """Write and commit shard ``shard`` from its records (in any order).

        Raises:
            ValueError: the records do not cover the shard's indices exactly, or X1 holds NaN or Inf.
            UserError: the shard could not be written (full disk, unwritable folder); nothing is committed, and a
                rerun of the same command regenerates it.
        """
        expected = self.manifest.shard_range(shard)
        records = sorted(records, key=lambda r: r.index)
        if [r.index for r in records] != list(expected):
            raise ValueError(f"shard {shard} needs samples {expected.start}..{expected.stop - 1} exactly")
        bad = [r.index for r in records if not torch.isfinite(r.x1).all()]
        if bad:
            raise ValueError(
                f"the teacher produced NaN or Inf in X1 for samples {bad[:10]}; shard {shard} was not written "
                "(try teacher dtype fp32 or bf16 instead of fp16)"
            )
        try:
            return self._write_and_commit(shard, records)
        except OSError as err:
            raise UserError(
                f"cannot write shard {shard} of {self.root} ({err.strerror or err}); free some space or fix the "
                f"folder, then rerun the same command: {len(self.done_shards())} shards are kept and it resumes there"
            ) from None

    def _write_and_commit(self, shard: int, records: Sequence[PairRecord]) -> Path:
        from litdata.streaming.writer import BinaryWriter

        tmp = self.root / _TMP / f"shard-{shard:06d}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        writer = BinaryWriter(str(tmp), chunk_size=self.manifest.shard_size)
        for position, record in enumerate(records):
            writer[position] = self._to_item(record)
        writer.done()
        crashpoint("chunk_written", shard)
        index = json.loads(Path(glob.glob(str(tmp / "*.index.json"))[0]).read_text())
        chunk = index["chunks"][0]
        target = self.root / shard_name(shard)
        os.replace(tmp / chunk["filename"], target)
        chunk["filename"] = target.name
        crashpoint("shard_moved", shard)
        size = target.stat().st_size
        commit = {
            "shard": shard,
            "chunk": chunk,
            "config": index["config"],
            "bytes": size,
            "sha256": _sha256(target),
            "tail_sha256": tail_sha256(target, size),
        }
        atomic_write_text(self.root / _PROGRESS / f"shard-{shard:06d}.json", json.dumps(commit, sort_keys=True))
        crashpoint("committed", shard)
        shutil.rmtree(tmp, ignore_errors=True)
        return target

    def finalize(self) -> Path:
        """Write ``index.json`` once every shard is committed; return its path.

        Raises:
            RuntimeError: some shards are missing.
        """
        pending = self.pending_shards()
        if pending:
            raise RuntimeError(f"cannot finalize {self.root}: shards {pending[:10]} are not written yet")
        chunks, config = [], None
        for shard in range(self.manifest.num_shards):
            record = json.loads((self.root / _PROGRESS / f"shard-{shard:06d}.json").read_text())
            chunks.append(record["chunk"])
            config = config or record["config"]
        try:
            crashpoint("before_index", self.manifest.num_shards - 1)
            atomic_write_text(self.root / INDEX_FILE, json.dumps({"chunks": chunks, "config": config}, sort_keys=True))
        except OSError as err:
            raise UserError(
                f"cannot write {self.root / INDEX_FILE} ({err.strerror or err}); free some space or fix the folder, "
                "then rerun the same command: every shard is kept and only the index is left to write"
            ) from None
        shutil.rmtree(self.root / _TMP, ignore_errors=True)
        return self.root / INDEX_FILE
