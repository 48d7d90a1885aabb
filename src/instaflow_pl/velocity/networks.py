"""The network classes a model folder's ``unet/`` may hold, and how to load them and read their latent geometry.

Every velocity or teacher network is a diffusers ``ModelMixin``/``ConfigMixin`` called like a UNet. Its
``config.json`` names the class (``_class_name``); this is the one place that maps that name to a class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instaflow_pl.errors import UserError


def _classes() -> dict[str, type]:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel

    from instaflow_pl.velocity.mlp import MLPVelocityNet

    return {
        "UNet2DConditionModel": UNet2DConditionModel,
        "SD3Transformer2DModel": SD3Transformer2DModel,
        "MLPVelocityNet": MLPVelocityNet,
    }


def network_class(name: str | None, source: str = "the model") -> type:
    """The class called ``name`` (a missing name means a diffusers UNet, as in older folders)."""
    classes = _classes()
    name = name or "UNet2DConditionModel"
    if name not in classes:
        raise UserError(f"{source} holds a {name}, which instaflow-pl cannot load; known: {', '.join(classes)}")
    return classes[name]


def load_network(root: str | Path, subfolder: str = "unet", torch_dtype: torch.dtype | None = None) -> nn.Module:
    """Load the network in ``root/subfolder`` with the class its ``config.json`` names."""
    config_file = Path(root) / subfolder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{config_file} not found: a model folder needs {subfolder}/config.json and its weights")
    try:
        name = json.loads(config_file.read_text()).get("_class_name")
    except json.JSONDecodeError as err:
        raise UserError(f"{config_file} is not valid JSON ({err})") from None
    cls = network_class(name, str(config_file))
    kwargs = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    return cls.from_pretrained(root, subfolder=subfolder, **kwargs)


def network_from_config(config: dict[str, Any], source: str = "the checkpoint") -> nn.Module:
    """A freshly initialised network from a saved config (``_class_name`` picks the class)."""
    cls = network_class(config.get("_class_name"), source)
    return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})


@dataclass(frozen=True)
class LatentGeometry:
    """The latents a network takes.

    Attributes:
        channels: Latent channels.
        size: Native height and width.
        down_factor: Height and width must be multiples of this.
    """

    channels: int
    size: int
    down_factor: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The native (C, H, W)."""
        return (self.channels, self.size, self.size)

    def fits(self, shape: tuple[int, ...] | list[int]) -> bool:
        """Whether latents of (C, H, W) ``shape`` can go through the network."""
        if len(shape) != 3 or shape[0] != self.channels or min(shape[1:]) <= 0:
            return False
        if self.down_factor == 0:  # a fixed-size network (e.g. an MLP on flattened latents)
            return tuple(shape[1:]) == (self.size, self.size)
        return not (shape[1] % self.down_factor or shape[2] % self.down_factor)

    def describe(self) -> str:
        """What fits, in words."""
        if self.down_factor == 0:
            return f"exactly {list(self.shape)}"
        return f"[{self.channels}, H, W] with H and W multiples of {self.down_factor}"


def latent_geometry(network: nn.Module) -> LatentGeometry:
    """The latent geometry of a network (UNet, SD3 transformer, demo MLP), from its config."""
    config = network.config
    size = config.sample_size if isinstance(config.sample_size, int) else config.sample_size[0]
    blocks = getattr(config, "down_block_types", None)
    patch = getattr(config, "patch_size", None)
    down_factor = 2 ** (len(blocks) - 1) if blocks else int(patch) if patch else 0
    return LatentGeometry(int(config.in_channels), int(size), down_factor)
