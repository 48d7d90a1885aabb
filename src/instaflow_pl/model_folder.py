"""A diffusers-format model folder, read once: :class:`ModelFolder` holds its kind, family, parts and configs.

Teachers, training modules, export, evaluation, sampling and the pipeline open a folder through
:meth:`ModelFolder.open`, so each file (``model_index.json``, ``instaflow.json``, the network's ``config.json``, the
VAE's and the scheduler's) is parsed in one place and each problem has one message.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES, PARTS, Family, family_named, family_of_network_config
from instaflow_pl.families.geometry import LatentGeometry
from instaflow_pl.kinds import KIND_FILE, KINDS, RELEASED_KIND, VELOCITY_KIND, normalise_kind

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


def read_json(path: Path, missing: str) -> dict[str, Any]:
    """``path`` parsed as a JSON object; ``missing`` is the message when the file is absent."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(missing) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore it from the model's source") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a JSON object; restore it from the model's source")
    return data


def mark_velocity_folder(root: str | Path, **info: object) -> Path:
    """Mark a diffusers-format folder whose network predicts velocity (a k-rectified flow) so loaders know its kind.

    Args:
        root: The folder.
        **info: Extra facts to record (family, base model, stage, ...).
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


@dataclass(frozen=True)
class ModelFolder:
    """A diffusers-format model folder, read once.

    Attributes:
        root: The local folder.
        source: What the user gave (folder or hub id).
        kind: ``released`` (as its authors published it) or ``velocity`` (a k-RF this project wrote).
        family: Its model family (:mod:`instaflow_pl.families`).
        index: ``model_index.json``.
        info: ``instaflow.json`` (empty for a released folder).
        network_config: The network's ``config.json`` (``_class_name`` included).
        scheduler_config: ``scheduler/scheduler_config.json``, or None when the folder has no scheduler.
        vae_config: ``vae/config.json``, or None for a pixel-space model.
    """

    root: Path
    source: str
    kind: str
    family: Family
    index: dict[str, Any]
    info: dict[str, Any]
    network_config: dict[str, Any]
    scheduler_config: dict[str, Any] | None
    vae_config: dict[str, Any] | None

    @classmethod
    def open(cls, source: str | Path) -> ModelFolder:
        """Read the folder ``source`` (a path, or a hub id when online) and check it holds its family's parts.

        Raises:
            UserError: one line naming what is missing or damaged and what to do.
        """
        root = resolve_model_folder(source)
        index = read_json(root / "model_index.json", f"{root} has no model_index.json; it is not a model folder")
        info = read_info(root)
        kind = normalise_kind(info.get("kind", RELEASED_KIND)) if info else RELEASED_KIND
        if kind not in KINDS:
            raise UserError(f"{root / KIND_FILE} names an unknown model kind {kind!r}; expected {VELOCITY_KIND!r}")
        family = _named_family(root, index, info)
        network_config = _network_config(root, family)
        if not family.owns_network_config(network_config):  # written before the family existed (digits: "sd")
            family = family_of_network_config(network_config, str(root / family.network_folder / "config.json"))
        family.check_folder(root)
        scheduler = root / "scheduler" / "scheduler_config.json"
        vae = root / "vae" / "config.json"
        return cls(
            root=root,
            source=str(source),
            kind=kind,
            family=family,
            index=index,
            info=info,
            network_config=network_config,
            scheduler_config=read_json(scheduler, "") if scheduler.is_file() else None,
            vae_config=read_json(vae, "") if vae.is_file() else None,
        )

    def has(self, part: str) -> bool:
        """Whether the folder holds subfolder ``part``."""
        return (self.root / part).is_dir()

    @property
    def pixels_per_latent(self) -> int:
        """Image pixels per latent pixel: the VAE's downsampling (1 without a VAE: latents are images)."""
        return vae_scale_factor(self.vae_config)

    @property
    def geometry(self) -> LatentGeometry:
        """The latents the folder's network takes."""
        return self.family.latent_geometry(self.network_config)

    def require_scheduler(self) -> dict[str, Any]:
        """The scheduler config, or a clear error (a teacher needs it)."""
        if self.scheduler_config is None:
            raise UserError(f"{self.root} has no scheduler/ subfolder; a teacher folder needs its scheduler config")
        return self.scheduler_config

    def load_network(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The folder's network, with the class its ``config.json`` names (one of its family's)."""
        cls = self.family.network_class(self.network_config.get("_class_name"))
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        return cls.from_pretrained(self.root, subfolder=self.family.network_folder, **kwargs)

    def load_vae(self, dtype: torch.dtype | None = None) -> nn.Module:
        """The folder's VAE, frozen, in eval mode (a clear error for a pixel-space folder)."""
        from diffusers import AutoencoderKL

        if self.vae_config is None:
            raise UserError(f"{self.root} has no vae/ subfolder; this needs a latent model with its VAE")
        kwargs = {} if dtype is None else {"torch_dtype": dtype}
        return AutoencoderKL.from_pretrained(self.root, subfolder="vae", **kwargs).requires_grad_(False).eval()

    def load_encoder(self, dtype: torch.dtype = torch.float32, cache_mb: float = 0.0):
        """The family's prompt encoder with the folder's tokenizers and text encoders."""
        return self.family.load_encoder(self, dtype, cache_mb)

    def fingerprint(self) -> str:
        """SHA-256 of the weights and configs that decide the folder's output as a teacher."""
        return fingerprint(self.root)


def vae_scale_factor(vae_config: dict[str, Any] | None) -> int:
    """Image pixels per latent pixel of a VAE of ``vae_config`` (1 without a VAE: latents are images)."""
    if vae_config is None:
        return 1
    return 2 ** max(len(vae_config.get("block_out_channels", [])) - 1, 0)


def read_info(root: Path) -> dict[str, Any]:
    """``root``'s ``instaflow.json`` (empty without one: a released model); one clear error when damaged."""
    marker = root / KIND_FILE
    if not marker.is_file():
        return {}
    try:
        info = json.loads(marker.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{marker} is not valid JSON ({err}); restore it, or delete it for a released folder") from None
    if not isinstance(info, dict):
        raise UserError(f"{marker} is not a JSON object; restore it, or delete it for a released folder")
    return info


def _named_family(root: Path, index: dict[str, Any], info: dict[str, Any]) -> Family:
    """The family ``instaflow.json`` records, else the one ``model_index.json``'s ``_class_name`` names."""
    if info.get("family") is not None:
        return family_named(info["family"], str(root / KIND_FILE))
    name = index.get("_class_name")
    if isinstance(name, list):  # a custom pipeline entry ([file, class]): this project's older exports
        name = name[-1]
    if name is None:  # hand-written folders without a class name were always read as Stable Diffusion
        return FAMILIES["sd"]
    for family in FAMILIES.values():
        if name in family.pipeline_classes:
            return family
    known = ", ".join(f"{c} ({f.name})" for f in FAMILIES.values() for c in f.pipeline_classes)
    raise UserError(
        f"{root} holds a {name} (model_index.json _class_name), which is not a known family; known: {known}"
    )


def _network_config(root: Path, family: Family) -> dict[str, Any]:
    path = root / family.network_folder / "config.json"
    if not path.parent.is_dir():
        family.check_folder(root)  # the family's one message for a missing part
    config = read_json(path, f"{path} not found: a model folder needs {family.network_folder}/config.json")
    config.setdefault("_class_name", "UNet2DConditionModel")  # older folders left it out
    return config
