"""Atomic file writes: a file is written under a temporary name beside it, flushed to disk and renamed into place.

A reader (or a rerun after a kill) therefore sees the old file or the new one, never a part of one. Temporaries are
named ``.<name>.<pid>.tmp``; a killed process can leave one behind, which :func:`remove_stale_temporaries` clears.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The temporary file beside ``path`` that this process writes before renaming it onto ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path for the block to write ``path``'s new content to (e.g. with a library's ``save``).

    When the block ends without an error the file is flushed to disk and renamed onto ``path``; when it raises, the
    temporary is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path) as tmp, tmp.open("wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode())


def remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporaries of atomic writes that a killed process left in ``folder``."""
    for leftover in folder.glob(".*.tmp"):
        leftover.unlink(missing_ok=True)
