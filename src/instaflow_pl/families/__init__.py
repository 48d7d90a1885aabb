"""Model families: Stable Diffusion 1.x/2.x (``sd``), SDXL (``sdxl``) and SD3 (``sd3``).

Each family is one file (see :class:`~instaflow_pl.families.base.Family`); this registry finds a folder's family
from its ``model_index.json`` (``_class_name``) or from this project's ``instaflow.json``, and a network's from its
class and config. A new family (e.g. Flux) is a new file and one entry in :data:`FAMILIES`.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.families.base import (
    KIND_FILE,
    SD_KIND,
    VELOCITY_KIND,
    Family,
    pixels_per_latent,
    read_model_index,
)
from instaflow_pl.families.sd import StableDiffusion
from instaflow_pl.families.sd3 import StableDiffusion3
from instaflow_pl.families.sdxl import StableDiffusionXL

FAMILIES: dict[str, Family] = {f.name: f for f in (StableDiffusion3(), StableDiffusionXL(), StableDiffusion())}
"""The families by name, most specific first (``sd`` takes any UNet the others do not claim)."""
PARTS: tuple[str, ...] = tuple(
    dict.fromkeys(
        part
        for family in FAMILIES.values()
        for part in (family.network_folder, "vae", *family.text_parts, *family.optional_text_parts, "scheduler")
    )
)
"""Every subfolder a model folder of some family may hold."""


def family_named(name: str, source: str = "the config") -> Family:
    """The family called ``name``."""
    if name not in FAMILIES:
        raise UserError(f"{source} names an unknown model family {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def family_of_folder(root: Path) -> Family:
    """The family of a diffusers-format folder: from ``instaflow.json`` (folders this project wrote) or from
    ``model_index.json``'s ``_class_name``."""
    marker = root / KIND_FILE
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text()).get("family")
        except json.JSONDecodeError as err:
            raise UserError(f"{marker} is not valid JSON ({err}); restore it or delete it") from None
        if recorded is not None:
            return family_named(recorded, str(marker))
    name = read_model_index(root).get("_class_name")
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


def family_of_network(network: nn.Module) -> Family:
    """The family whose network ``network`` is."""
    return next(f for f in FAMILIES.values() if f.owns_network(network))


__all__ = [
    "FAMILIES",
    "PARTS",
    "SD_KIND",
    "VELOCITY_KIND",
    "Family",
    "family_named",
    "family_of_folder",
    "family_of_network",
    "pixels_per_latent",
    "read_model_index",
]
