"""The sharded-predict machine's pieces: atomic writes, shard arithmetic, the split over ranks, micro-batches, and
an output folder opened against its record or refused (pair generation and evaluation run on them end to end)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from instaflow_pl.errors import UserError
from instaflow_pl.fileio import atomic_path, atomic_write_text, remove_stale_temporaries
from instaflow_pl.predict import ShardedFolder, WorkBatches, round_robin, shard_count, shard_range


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "report.md"
    atomic_write_text(path, "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed while writing")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
    atomic_write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / f".index.json.{os.getpid() + 1}.tmp").write_text("{")
    (tmp_path / "index.json").write_text("{}")
    remove_stale_temporaries(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]


def test_shards_cover_every_sample_once_and_ranks_take_them_round_robin():
    assert shard_count(10, 4) == 3 and shard_count(8, 4) == 2
    assert [shard_range(k, 4, 10) for k in range(3)] == [range(0, 4), range(4, 8), range(8, 10)]
    pending = [1, 2, 4, 5, 6]
    split = [round_robin(pending, rank, 2) for rank in range(2)]
    assert split == [[1, 4, 6], [2, 5]]
    assert sorted(sum(split, [])) == pending


class _Indices(WorkBatches[tuple]):
    def batch(self, key, indices):
        return key, indices


def test_micro_batches_never_cross_a_unit():
    units = [("a", range(0, 5)), ("b", range(8, 10))]
    assert list(_Indices(units, batch_size=2)) == [("a", [0, 1]), ("a", [2, 3]), ("a", [4]), ("b", [8, 9])]


class _Folder(ShardedFolder):
    record_file = "record.txt"
    folder_name = "output_dir"

    def __init__(self, root: Path, settings: str):
        super().__init__(root)
        self.settings = settings

    def record_text(self) -> str:
        return self.settings

    def differences(self, path: Path) -> list[str]:
        theirs = path.read_text()
        return [] if theirs == self.settings else [f"{theirs} in the folder, {self.settings} now"]

    def refusal(self, differences: list[str]) -> str:
        return f"{self.root} holds other results ({'; '.join(differences)})"

    def pending_units(self) -> list[int]:
        return [0]

    def unit_range(self, key: int) -> range:
        return range(4)


def test_a_folder_is_created_resumed_with_the_same_record_and_refused_otherwise(tmp_path):
    out = tmp_path / "out"
    _Folder(out, "seed 0").open()
    assert (out / "record.txt").read_text() == "seed 0"
    (out / ".record.txt.1.tmp").write_text("left by a killed run")
    _Folder(out, "seed 0").open()  # the same settings: resumed, the leftover cleared
    assert sorted(p.name for p in out.iterdir()) == ["record.txt"]
    with pytest.raises(UserError, match=r"holds other results \(seed 0 in the folder, seed 1 now\)"):
        _Folder(out, "seed 1").open()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="output_dir .*other is not empty and holds no record.txt; choose a new folder"):
        _Folder(other, "seed 0").open()
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
