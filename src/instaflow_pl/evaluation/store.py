"""The evaluation folder: per-shard results committed atomically, so a killed evaluation resumes where it stopped.

Layout::

    evaluation.json                   what decides the numbers of every row (captions, noises, metric networks)
    rows/<row id>/row.json            one row: the model (its weights' fingerprint), solver, steps, guidance
    rows/<row id>/shard-000000.safetensors ...
                                      samples [k * shard_size, (k + 1) * shard_size) of the row: their FID features
                                      (float32, one vector a sample), CLIP scores (float64, one a sample) and NFE,
                                      plus the uint8 images of the grid's samples (the first captions)
    rows/<row id>/timing.json         the warm speed measurement of the row
    report.md, report.json, grid.png  written once every row is complete

Images themselves are not kept: the features and scores are what the numbers are computed from. A shard file is
written to a temporary name, flushed to disk and renamed into place, so it exists whole or not at all: the rename
is its commit. A row folder whose ``row.json`` names another model or setting is never reused.
"""

from __future__ import annotations

import json
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from instaflow_pl.errors import UserError
from instaflow_pl.faults import crashpoint
from instaflow_pl.fileio import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from instaflow_pl.predict.store import ShardedFolder
from instaflow_pl.predict.work import shard_count, shard_range

EVALUATION_FILE = "evaluation.json"
ROW_FILE = "row.json"
TIMING_FILE = "timing.json"
FORMAT_VERSION = 1
REPORT_FILES = ("report.md", "report.json", "grid.png")

# Fields that say where things came from, not what they are: a moved folder or file is fine.
_INFORMATIONAL = {"captions_source", "reference_folder", "folder", "name"}


@dataclass(frozen=True)
class EvaluationSpec:
    """What every row of an evaluation shares: change any of it and the numbers change.

    Attributes:
        num_samples: Samples per row.
        seed: Sample i uses the noise of ``seed + i``, in every row.
        shard_size: Samples per shard (the unit of resumption).
        captions_sha256: SHA-256 of the caption list (after ``num_samples``).
        features: Fingerprint of the FID feature network.
        reference: Key of the reference image statistics (folder listing, resolution, crop).
        clip: Fingerprint of the CLIP model (empty: no CLIP score).
        grid_columns: Samples kept as images for the grid.
        captions_source: The captions file (informational).
        reference_folder: The reference image folder (informational).
        format_version: Version of this layout.
    """

    num_samples: int
    seed: int
    shard_size: int
    captions_sha256: str
    features: str
    reference: str
    clip: str
    grid_columns: int
    captions_source: str = ""
    reference_folder: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        """Shards a row is cut into."""
        return shard_count(self.num_samples, self.shard_size)

    def shard_range(self, shard: int) -> range:
        """Sample indices of ``shard``."""
        return shard_range(shard, self.shard_size, self.num_samples)


@dataclass(frozen=True)
class RowSpec:
    """One row of the report: a model at one step count and guidance weight.

    Attributes:
        name: Display name of the model.
        folder: Its folder (informational).
        kind: ``velocity`` (a rectified flow, Euler) or ``sd`` (a diffusion model through its scheduler).
        fingerprint: SHA-256 of the model's weights and configs.
        solver: Solver name.
        steps: Solver steps.
        guidance: Classifier-free guidance weight.
        dtype: Weight dtype.
    """

    name: str
    folder: str
    kind: str
    fingerprint: str
    solver: str
    steps: int
    guidance: float
    dtype: str

    @property
    def id(self) -> str:
        """Folder name of the row: the model's name, steps and guidance, in characters safe for any file system."""
        safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in self.name).strip("-.") or "model"
        return f"{safe}-steps{self.steps}-w{self.guidance:g}"


def _differences(mine: object, theirs: object) -> list[str]:
    a, b = asdict(mine), asdict(theirs)  # type: ignore[call-overload]
    return [f"{k} {b.get(k)!r} in the folder, {a[k]!r} now" for k in a if k not in _INFORMATIONAL and a[k] != b.get(k)]


@dataclass
class ShardResult:
    """What one shard of a row holds.

    Attributes:
        indices: Sample indices, in order.
        features: FID features, (N, D) float32.
        clip: CLIP scores, (N,) float64 (empty without a CLIP model).
        nfe: Network evaluations per image.
        images: uint8 images (K, 3, H, W) of the shard's first samples that the grid shows.
    """

    indices: list[int]
    features: torch.Tensor
    clip: torch.Tensor
    nfe: int
    images: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, 1, 1, dtype=torch.uint8))


class EvaluationStore(ShardedFolder):
    """An evaluation folder (see the module docstring for its layout).

    Args:
        root: The folder.
        spec: What the rows share.
        rows: The rows to evaluate.
    """

    record_file = EVALUATION_FILE
    folder_name = "output_dir"

    def __init__(self, root: str | Path, spec: EvaluationSpec, rows: list[RowSpec]):
        super().__init__(root)
        self.spec = spec
        self.rows = rows

    def row_dir(self, row: int) -> Path:
        """Folder of row ``row``."""
        return self.root / "rows" / self.rows[row].id

    def record_text(self) -> str:
        """The text of ``evaluation.json``."""
        return _json(self.spec)

    def differences(self, path: Path) -> list[str]:
        """How the evaluation recorded at ``path`` differs from this one."""
        return _differences(self.spec, _read(path, EvaluationSpec))

    def refusal(self, differences: list[str]) -> str:
        """The line that refuses a folder holding another evaluation."""
        return (
            f"{self.root} holds an evaluation with other settings ({'; '.join(differences)}); use a new output_dir, "
            "or restore the original settings to resume it"
        )

    def check(self) -> None:
        """Two rows may not share a folder."""
        ids = [row.id for row in self.rows]
        if len(set(ids)) != len(ids):
            twice = sorted({i for i in ids if ids.count(i) > 1})
            raise UserError(f"two rows would share the folder {twice[0]}; give the models different names")

    def prepare(self) -> None:
        """Create each row's folder with its ``row.json``, or check that it holds the same row.

        Raises:
            UserError: a row folder holds results of another model or setting.
        """
        for k, row in enumerate(self.rows):
            folder = self.row_dir(k)
            record = folder / ROW_FILE
            if record.is_file():
                diff = _differences(row, _read(record, RowSpec))
                if diff:
                    raise UserError(
                        f"{folder} holds results of another model or setting ({'; '.join(diff)}); give the model "
                        "another name, or use a new output_dir"
                    )
                remove_stale_temporaries(folder)
            else:
                folder.mkdir(parents=True, exist_ok=True)
                atomic_write_text(record, _json(row))

    def shard_path(self, row: int, shard: int) -> Path:
        """File of shard ``shard`` of row ``row``."""
        return self.row_dir(row) / f"shard-{shard:06d}.safetensors"

    def pending_units(self) -> list[tuple[int, int]]:
        """(row, shard) pairs still to compute, row by row."""
        return [
            (k, s)
            for k in range(len(self.rows))
            for s in range(self.spec.num_shards)
            if not self.shard_path(k, s).is_file()
        ]

    def unit_range(self, key: Hashable) -> range:
        """Sample indices of the (row, shard) unit ``key``."""
        _, shard = key  # type: ignore[misc]
        return self.spec.shard_range(shard)

    def write_shard(self, row: int, shard: int, result: ShardResult, rank: int = 0) -> Path:
        """Commit one shard of a row (atomically); ``rank`` (the process that computed it) is recorded.

        Raises:
            ValueError: the result does not cover the shard's samples exactly, or holds NaN or Inf.
            UserError: the file could not be written (a full disk, an unwritable folder); a rerun recomputes it.
        """
        from safetensors.torch import save

        expected = list(self.spec.shard_range(shard))
        if result.indices != expected:
            raise ValueError(f"shard {shard} of row {self.rows[row].id} needs samples {expected[0]}..{expected[-1]}")
        if not torch.isfinite(result.features).all():
            raise ValueError(
                f"row {self.rows[row].id} produced images whose FID features are NaN or Inf (samples "
                f"{expected[0]}..{expected[-1]}); try dtype fp32 for this model"
            )
        tensors = {
            "indices": torch.tensor(result.indices, dtype=torch.int64),
            "features": result.features.detach().to("cpu", torch.float32).contiguous(),
            "clip": result.clip.detach().to("cpu", torch.float64).contiguous(),
            "images": result.images.detach().to("cpu", torch.uint8).contiguous(),
        }
        metadata = {"row": self.rows[row].id, "shard": str(shard), "nfe": str(result.nfe), "rank": str(rank)}
        data = save(tensors, metadata=metadata)
        path = self.shard_path(row, shard)
        unit = row * self.spec.num_shards + shard  # the crash points count shards over all rows
        try:
            crashpoint("eval_shard", unit)
            atomic_write_bytes(path, data)
        except OSError as err:
            raise UserError(
                f"cannot write {path} ({err.strerror or err}); free some space or fix the folder, then rerun the same "
                "command: the shards already written are kept and it resumes there"
            ) from None
        crashpoint("eval_committed", unit)
        return path

    def read_row(self, row: int) -> ShardResult:
        """Every shard of a row, concatenated in sample order."""
        from safetensors import safe_open

        parts: list[dict[str, torch.Tensor]] = []
        nfe = 0
        for shard in range(self.spec.num_shards):
            path = self.shard_path(row, shard)
            try:
                with safe_open(str(path), framework="pt") as file:
                    parts.append({key: file.get_tensor(key) for key in file.keys()})
                    nfe = int((file.metadata() or {}).get("nfe", 0))
            except Exception as err:  # safetensors raises its own error types for a damaged file
                raise UserError(f"cannot read {path} ({err}); delete it and rerun to recompute that shard") from None
        images = [p["images"] for p in parts if p["images"].shape[0]]
        return ShardResult(
            indices=torch.cat([p["indices"] for p in parts]).tolist(),
            features=torch.cat([p["features"] for p in parts]),
            clip=torch.cat([p["clip"] for p in parts]),
            nfe=nfe,
            images=torch.cat(images) if images else torch.zeros(0, 3, 1, 1, dtype=torch.uint8),
        )

    def timing(self, row: int) -> dict | None:
        """The row's recorded speed measurement, if any."""
        path = self.row_dir(row) / TIMING_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def write_timing(self, row: int, timing: dict) -> None:
        """Record the row's speed measurement (atomically)."""
        atomic_write_text(self.row_dir(row) / TIMING_FILE, json.dumps(timing, indent=2, sort_keys=True) + "\n")


def _json(record: object) -> str:
    return json.dumps(asdict(record), indent=2, sort_keys=True) + "\n"  # type: ignore[call-overload]


def _read(path: Path, cls: type):
    try:
        data = json.loads(path.read_text())
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})
    except (json.JSONDecodeError, TypeError) as err:
        raise UserError(f"{path} is damaged ({err}); use a new output_dir") from None
