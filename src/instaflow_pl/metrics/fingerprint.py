"""Content hashes that key cached metric statistics: of tensors, of feature networks, of image folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
"""File suffixes that count as images in a reference folder."""


def _update_with_tensor(digest: hashlib._Hash, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous().reshape(-1)
    digest.update(f"{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.view(torch.uint8).numpy().tobytes())


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    digest.update(f"tensor|{tuple(tensor.shape)}|".encode())
    _update_with_tensor(digest, tensor)
    return digest.hexdigest()


def module_fingerprint(module: nn.Module) -> str:
    """SHA-256 of a module's class, its ``fingerprint_tag`` (if it has one) and every entry of its state dict (names,
    dtypes, shapes, bytes).

    A ``fingerprint_tag`` names what a module computes beyond its weights (e.g. how FID's Inception turns images into
    uint8), so a change of it keys new cached statistics; modules without one hash as they always did.
    """
    digest = hashlib.sha256()
    digest.update(f"module|{type(module).__module__}.{type(module).__qualname__}|".encode())
    tag = getattr(module, "fingerprint_tag", None)
    if tag:
        digest.update(f"tag|{tag}|".encode())
    for name, value in module.state_dict().items():
        digest.update(f"{name}|".encode())
        if isinstance(value, torch.Tensor):
            _update_with_tensor(digest, value)
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder`` (recursively), sorted by relative path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder_fingerprint(folder: Path, extra: str = "") -> str:
    """SHA-256 of the listing of a folder's images: relative paths and sizes (plus ``extra``, e.g. a resolution)."""
    digest = hashlib.sha256()
    digest.update(f"folder|{extra}|".encode())
    for path in image_files(folder):
        digest.update(f"{path.relative_to(folder).as_posix()}|{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def text_fingerprint(text: str) -> str:
    """SHA-256 of a user-given key (so every key has the same form)."""
    return hashlib.sha256(f"key|{text}".encode()).hexdigest()
