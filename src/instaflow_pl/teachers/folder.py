"""Model folders in diffusers format: finding them, telling their kind, fingerprinting their weights."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from instaflow_pl.errors import UserError
from instaflow_pl.families.base import KIND_FILE, SD_KIND, VELOCITY_KIND

FOLDER_FORMAT_VERSION = 1
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# In this order (a dataset's manifest keeps the digest, so reordering would refuse every resume).
_FINGERPRINT_PARTS = (
    "unet",
    "transformer",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
    "scheduler",
)


def resolve_model_folder(source: str | Path) -> Path:
    """Return the local diffusers-format folder for ``source`` (a folder, or a hub id when online).

    Raises:
        UserError: the folder does not exist, is not in diffusers format, or the hub id cannot be fetched.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{path} is not a diffusers-format model folder (no model_index.json); point at a folder saved "
                "with save_pretrained, e.g. a Stable Diffusion 1.5 download, or build one with `instaflow-pl tiny`"
            )
        return path
    if path.exists():
        raise UserError(f"{path} is a file; a model is a diffusers-format folder")
    owner = Path(str(source).split("/")[0])
    looks_local = str(source).startswith((".", "~", "/")) or owner.is_dir()  # e.g. outputs/2rf before it exists
    if isinstance(source, str) and _HUB_ID.match(source) and not looks_local:
        return _download(source)
    raise UserError(f"model folder not found: {path} (build the tiny one with `make tiny`, or give a real SD folder)")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    from instaflow_pl.families import PARTS
    from instaflow_pl.hub import require_hub

    patterns = ["*.json", "*.txt", "*/*.json", "*/*.txt", "*/*.model"]  # configs, vocabularies, T5's spiece.model
    patterns += [f"{part}/*.safetensors" for part in PARTS]  # every family's weights (unet or transformer, encoders)
    cached = require_hub(repo_id, "model", patterns)  # fails in seconds without a network, not after the retries
    if cached is not None:
        return cached
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line
        raise UserError(
            f"{repo_id!r} is not a local folder and could not be fetched from the hub ({type(err).__name__}); "
            "download the model to a folder and pass its path"
        ) from None


def model_kind(root: Path) -> str:
    """``velocity`` for a rectified-flow folder marked by this project, else ``sd`` (a diffusion model)."""
    marker = root / KIND_FILE
    if not marker.is_file():
        return SD_KIND
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{marker} is not valid JSON ({err}); restore it or delete it for an SD folder") from None
    kind = info.get("kind")
    if kind not in (SD_KIND, VELOCITY_KIND):
        raise UserError(f"{marker} names an unknown model kind {kind!r}; expected {VELOCITY_KIND!r}")
    return kind


def mark_velocity_folder(root: str | Path, **info: object) -> Path:
    """Mark a diffusers-format folder whose UNet predicts velocity (a k-rectified flow) so loaders know its kind.

    Args:
        root: The folder.
        **info: Extra facts to record (base model, stage, ...).
    """
    marker = Path(root) / KIND_FILE
    payload = {"kind": VELOCITY_KIND, "format_version": FOLDER_FORMAT_VERSION, **info}
    marker.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return marker


def fingerprint(root: Path, parts: tuple[str, ...] = _FINGERPRINT_PARTS) -> str:
    """SHA-256 over the files of the parts that decide a teacher's output (weights, configs, vocabulary)."""
    digest = hashlib.sha256()
    for part in parts:
        folder = root / part
        if not folder.is_dir():
            continue
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            digest.update(str(file.relative_to(root)).encode())
            with file.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
    return digest.hexdigest()
