"""Prompt sources: plain text, JSONL, parquet and COCO captions files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from instaflow_pl.errors import UserError

FORMATS = ("txt", "jsonl", "parquet", "coco")
"""Prompt file formats; ``auto`` picks one from the file name."""


def _detect(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".txt", ".text", ".csv"):
        return "txt"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    if suffix == ".json":
        return "coco"
    raise UserError(f"cannot tell the format of prompt file {path}; set format to one of {', '.join(FORMATS)}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"prompt file {path} is not UTF-8 text (byte {err.start}); re-encode it as UTF-8") from None


def _from_txt(path: Path) -> list[str]:
    return [line.strip() for line in _read_text(path).splitlines() if line.strip()]


def _missing_column(path: Path, column: str, available: list[str]) -> UserError:
    return UserError(f"prompt file {path} has no column {column!r}; set column to one of {sorted(available)}")


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a UTF-8 JSONL file; a bad line is a clear error."""
    rows = []
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"line {number} of {path} is not valid JSON; fix or remove it") from None
        if not isinstance(row, dict):
            raise UserError(f"line {number} of {path} is not a JSON object")
        rows.append((number, row))
    return rows


def _from_jsonl(path: Path, column: str) -> list[str]:
    prompts = []
    for _, row in read_jsonl(path):
        if column not in row:
            raise _missing_column(path, column, list(row))
        prompts.append(str(row[column]))
    return prompts


def _from_parquet(path: Path, column: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise UserError(f"{path} is not a readable parquet file; check the file or its format option") from None
    if column not in schema.names:
        raise _missing_column(path, column, schema.names)
    return [str(v) for v in pq.read_table(path, columns=[column]).column(column).to_pylist()]


def _coco_annotations(path: Path) -> list:
    """The ``annotations`` list of a COCO captions file (one clear error if it is not one)."""
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError:
        raise UserError(f"{path} is not valid JSON; a COCO captions file holds {{'annotations': [...]}}") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise UserError(f"{path} has no 'annotations' list; is it a COCO captions file (captions_*.json)?")
    return data["annotations"]


def _from_coco(path: Path) -> list[str]:
    return [str(a["caption"]).strip() for a in _coco_annotations(path) if isinstance(a, dict) and "caption" in a]


def coco_captions_per_image(path: str | Path) -> list[str]:
    """One caption per image of a COCO captions file: images in increasing ``image_id`` order, each with its first
    caption (the annotation with the lowest annotation ``id``; in file order where ids are missing).

    This is the usual rule of text-to-image evaluations on COCO (one prompt per reference image), and it does not
    depend on the order of the file's annotations.

    Args:
        path: A COCO captions file (``captions_val2017.json``, ``captions_val2014.json``).

    Returns:
        The captions, stripped, in image-id order.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"captions file not found: {path}; check the path (e.g. annotations/captions_val2017.json)")
    first: dict[int, tuple[float, int, str]] = {}
    for position, item in enumerate(_coco_annotations(path)):
        if not isinstance(item, dict) or "caption" not in item or "image_id" not in item:
            continue
        rank = (float(item.get("id", float("inf"))), position)
        image = int(item["image_id"])
        if image not in first or rank < first[image][:2]:
            first[image] = (*rank, str(item["caption"]).strip())
    return [first[image][2] for image in sorted(first)]


def load_prompts(
    path: str | Path,
    format: str = "auto",
    column: str = "prompt",
    limit: int | None = None,
    repeats: int = 1,
) -> list[str]:
    """Read prompts from a file.

    Args:
        path: The prompt file.
        format: ``auto`` (from the extension: .txt, .jsonl, .parquet, .json = COCO captions) or one of ``FORMATS``.
        column: Field holding the prompt in JSONL and parquet files.
        limit: Keep at most this many prompts (before repeats).
        repeats: Emit each prompt this many times in a row (different noise each time).

    Returns:
        The prompts, in file order.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}; check the path (data.init_args.prompts)")
    kind = _detect(path) if format == "auto" else format
    readers = {
        "txt": lambda: _from_txt(path),
        "jsonl": lambda: _from_jsonl(path, column),
        "parquet": lambda: _from_parquet(path, column),
        "coco": lambda: _from_coco(path),
    }
    if kind not in readers:
        raise UserError(f"unknown prompt format {kind!r}: choose auto or one of {', '.join(FORMATS)}")
    if repeats < 1:
        raise UserError(f"repeats must be >= 1, got {repeats}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1 (or null for all prompts), got {limit}")
    prompts = readers[kind]()
    if not prompts:
        raise UserError(f"prompt file {path} holds no prompts; add one prompt per line (or per row)")
    prompts = prompts[:limit] if limit is not None else prompts
    return [p for p in prompts for _ in range(repeats)]


def prompts_digest(prompts: list[str]) -> str:
    """SHA-256 of a prompt list (recorded in a dataset's manifest)."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()
