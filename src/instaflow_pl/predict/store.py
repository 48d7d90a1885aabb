"""The output folder of a sharded predict run: opened against the record of its settings, or refused.

A folder holds a record file (what decides every byte of its results) and one committed file or record per unit of
work. Opening a folder that holds a record of other settings, or something else entirely, is refused with one line,
so results of different settings never mix; opening one with the same record resumes it. Subclasses say what the
record is, how the units are named and what else the folder holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from pathlib import Path
from typing import ClassVar

from instaflow_pl.errors import UserError
from instaflow_pl.fileio import atomic_write_text, remove_stale_temporaries


class ShardedFolder(ABC):
    """A folder of results committed one unit of work at a time.

    Args:
        root: The folder.
    """

    record_file: ClassVar[str]
    """Name of the record of the settings, written first."""

    folder_name: ClassVar[str]
    """How messages name the folder (the setting that chooses it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()

    @abstractmethod
    def record_text(self) -> str:
        """The record file's content for these settings."""

    @abstractmethod
    def differences(self, path: Path) -> list[str]:
        """What differs (in words) between the record at ``path`` and these settings; empty when they match."""

    @abstractmethod
    def refusal(self, differences: list[str]) -> str:
        """The line that refuses a folder whose record differs."""

    @abstractmethod
    def pending_units(self) -> list[Hashable]:
        """Keys of the units still to compute, in order."""

    @abstractmethod
    def unit_range(self, key: Hashable) -> range:
        """Sample indices of unit ``key``."""

    def check(self) -> None:
        """Refuse settings that cannot be written (before anything is); by default none are refused."""
        return None

    def prepare(self) -> None:
        """Create what the folder holds beside its record, and clear leftovers of interrupted writes (default: none)."""
        return None

    def open(self) -> None:
        """Create the folder for these settings, or check that it holds the same ones (call on one process only).

        Raises:
            UserError: the folder holds results of other settings or something else, or cannot be written.
        """
        record = self.root / self.record_file
        if record.is_file():
            differences = self.differences(record)
            if differences:
                raise UserError(self.refusal(differences))
        elif self.root.exists() and any(self.root.iterdir()):
            raise UserError(
                f"{self.folder_name} {self.root} is not empty and holds no {self.record_file}; choose a new folder"
            )
        self.check()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.root)
            if not record.is_file():
                atomic_write_text(record, self.record_text())
            self.prepare()
        except OSError as err:
            raise UserError(
                f"cannot write to {self.folder_name} {self.root} ({err.strerror}); choose a writable one"
            ) from None
