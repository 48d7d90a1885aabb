"""Model families: Stable Diffusion 1.x/2.x (``sd``), SDXL (``sdxl``), SD3 (``sd3``), FLUX.1 (``flux``) and the
digits demo's pixel-space MLP (``digits``).

Each family is one file plus its tiny fixture (see :class:`~instaflow_pl.families.base.Family`). This registry maps
names to families and networks to their family; :class:`~instaflow_pl.model_folder.ModelFolder` finds a folder's.
A new family is a new file, its fixture, and one entry in :data:`FAMILIES` (or :func:`register`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.families.base import Family
from instaflow_pl.families.digits import Digits
from instaflow_pl.families.flux import Flux
from instaflow_pl.families.geometry import LatentGeometry
from instaflow_pl.families.sd import StableDiffusion
from instaflow_pl.families.sd3 import StableDiffusion3
from instaflow_pl.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {}
"""The families by name. Their networks are disjoint: each network config belongs to exactly one family."""
PARTS: list[str] = []
"""Every subfolder a model folder of some family may hold."""


def register(family: Family) -> Family:
    """Add ``family`` to the registry (a family defined outside this package, e.g. in a test or a plugin)."""
    if family.name in FAMILIES and type(FAMILIES[family.name]) is not type(family):
        raise ValueError(f"a family called {family.name!r} is already registered")
    FAMILIES[family.name] = family
    parts = (family.network_folder, "vae", *family.text_parts, *family.optional_text_parts, "scheduler")
    PARTS.extend(part for part in parts if part not in PARTS)
    return family


def unregister(name: str) -> None:
    """Remove the family called ``name`` (tests that register one of their own)."""
    FAMILIES.pop(name, None)


for _family in (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Digits(), Flux()):
    register(_family)


def family_named(name: str, source: str = "the config") -> Family:
    """The family called ``name`` (or a name records gave it before, e.g. ``sd`` for the digits demo's models is
    still ``sd`` here: the folder's network decides, see :class:`~instaflow_pl.model_folder.ModelFolder`)."""
    if name not in FAMILIES:
        raise UserError(f"{source} names an unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_network_config(config: Mapping[str, Any], source: str = "the model") -> Family:
    """The family whose network ``config`` (with ``_class_name``) describes."""
    for family in FAMILIES.values():
        if family.owns_network_config(config):
            return family
    known = sorted({name for f in FAMILIES.values() for _, name in f.network_classes})
    raise UserError(
        f"{source} holds a {config.get('_class_name')}, which instaflow-pl cannot load; known: {', '.join(known)}"
    )


def family_of_network(network: nn.Module) -> Family:
    """The family whose network ``network`` is."""
    return family_of_network_config({**network.config, "_class_name": type(network).__name__}, type(network).__name__)


def network_from_config(config: Mapping[str, Any], source: str = "the checkpoint") -> nn.Module:
    """A freshly initialised network from a saved config (its ``_class_name`` picks the family and class)."""
    config = {"_class_name": "UNet2DConditionModel", **config}  # older records left the class out
    family = family_of_network_config(config, source)
    cls = family.network_class(config["_class_name"])
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def latent_geometry(network: nn.Module) -> LatentGeometry:
    """The latent geometry of ``network``, as its family reads it from the network's config."""
    return family_of_network(network).latent_geometry(network.config)


__all__ = [
    "FAMILIES",
    "PARTS",
    "Family",
    "LatentGeometry",
    "family_named",
    "family_of_network",
    "family_of_network_config",
    "latent_geometry",
    "network_from_config",
    "register",
    "unregister",
]
