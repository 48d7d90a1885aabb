"""DMD2's GAN term (Yin et al. 2024, arXiv 2405.14867, stage 2): a small classifier head on the fake score network's
bottleneck features, trained as the critic with the fake score's optimizer, whose non-saturating loss the generator
also minimises.

Where the bottleneck is depends on the network, so it is looked up by the network's class name in
:data:`BOTTLENECKS` (``register_bottleneck`` adds a network): a UNet's mid-block output (B, C, h, w), as DMD2's
``classify_forward`` takes it (``main/sd_unet_forward.py``, the last entry of its list); a transformer's image
hidden states after its blocks (the input of its ``norm_out``), (B, N, D), mean-pooled over the tokens; the project's
MLP velocity network's hidden features before its ``norm_out``, (B, D). The network's forward stops at the bottleneck
(the rest of it is not needed), as DMD2's classify mode returns there.

Losses (DMD2's ``main/sd_guidance.py``): the generator's ``softplus(-D(fake))``, the critic's
``softplus(D(fake)) + softplus(-D(real))``; the images are noised first to a flow time uniform in ``[t_min, 1]``
(DMD2's ``diffusion_gan``: a timestep uniform in ``[0, diffusion_gan_max_timestep)``, 1000 in its recipes).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from instaflow_pl.errors import UserError


@dataclass(frozen=True)
class Bottleneck:
    """Where a network's bottleneck features are and how wide they are.

    Attributes:
        module: Attribute path of the submodule (``mid_block``, ``norm_out``).
        side: ``output`` (the submodule's output) or ``input`` (its first positional input).
        channels: The feature width from the network's config.
    """

    module: str
    side: str
    channels: Callable[[Mapping[str, Any]], int]


def _heads(config: Mapping[str, Any]) -> int:
    return int(config["num_attention_heads"]) * int(config["attention_head_dim"])


BOTTLENECKS: dict[str, Bottleneck] = {
    "UNet2DConditionModel": Bottleneck("mid_block", "output", lambda c: int(c["block_out_channels"][-1])),
    "SD3Transformer2DModel": Bottleneck("norm_out", "input", _heads),
    "FluxTransformer2DModel": Bottleneck("norm_out", "input", _heads),
    "MLPVelocityNet": Bottleneck("norm_out", "input", lambda c: int(c["width"])),
}
"""Network class name -> its bottleneck (one entry per network class the families load)."""


def register_bottleneck(class_name: str, bottleneck: Bottleneck) -> None:
    """Declare the bottleneck of another network class (a new family's), so the GAN head can sit on it."""
    BOTTLENECKS[class_name] = bottleneck


def bottleneck_of(network: nn.Module) -> Bottleneck:
    """The registered bottleneck of ``network``; one line when its class has none."""
    name = type(network).__name__
    if name not in BOTTLENECKS:
        raise UserError(
            f"the GAN head does not know where a {name}'s bottleneck is (known: {', '.join(sorted(BOTTLENECKS))}); "
            "register it with instaflow_pl.modules.dmd_gan.register_bottleneck or set the gan weights to 0"
        )
    return BOTTLENECKS[name]


class _Stop(Exception):
    """Raised by the feature hook to end the network's forward at the bottleneck."""


def bottleneck_features(network: nn.Module, call: Callable[[], Any]) -> torch.Tensor:
    """The bottleneck features of ``network`` during ``call()`` (a forward through it), which stops there.

    The features keep their graph: gradients reach the network's parameters before the bottleneck and its input.
    """
    spec = bottleneck_of(network)
    module = network.get_submodule(spec.module)
    captured: list[torch.Tensor] = []

    def keep(value: torch.Tensor) -> None:
        captured.append(value)
        raise _Stop

    if spec.side == "output":
        handle = module.register_forward_hook(lambda m, args, out: keep(out[0] if isinstance(out, tuple) else out))
    else:
        handle = module.register_forward_pre_hook(lambda m, args: keep(args[0]))
    try:
        call()
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(network).__name__}.{spec.module} was not called: no bottleneck features")
    return captured[0]


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


class GANHead(nn.Module):
    """The classifier on bottleneck features: one logit per sample.

    Spatial features (B, C, h, w) go through DMD2's head shape, a 4x4 stride-2 convolution, GroupNorm and SiLU, then
    (ours, for any h and w) a global average and a linear map; token features (B, N, D) are mean-pooled over tokens,
    vector features (B, D) taken as they are, then LayerNorm, a hidden layer with SiLU, and a linear map.

    Args:
        channels: The feature width (C or D).
        spatial: The features are (B, C, h, w).
    """

    def __init__(self, channels: int, spatial: bool):
        super().__init__()
        self.spatial = spatial
        if spatial:
            self.body = nn.Sequential(
                nn.Conv2d(channels, channels, kernel_size=4, stride=2, padding=1),
                nn.GroupNorm(_groups(channels), channels),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
        else:
            self.body = nn.Sequential(nn.LayerNorm(channels), nn.Linear(channels, channels), nn.SiLU())
        self.out = nn.Linear(channels, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B,) of ``features``."""
        features = features.float()
        if not self.spatial and features.ndim == 3:
            features = features.mean(dim=1)
        return self.out(self.body(features)).squeeze(1)


def gan_head_for(network: nn.Module) -> GANHead:
    """A GAN head sized for ``network``'s bottleneck (a UNet's features are spatial; the others are not)."""
    spec = bottleneck_of(network)
    return GANHead(spec.channels(network.config), spatial=spec.side == "output")


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's non-saturating loss per sample, ``softplus(-D(fake))``."""
    return nn.functional.softplus(-fake_logits.float())


def critic_gan_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """The critic's loss, ``mean softplus(D(fake)) + mean softplus(-D(real))`` (DMD2's classification loss)."""
    return nn.functional.softplus(fake_logits.float()).mean() + nn.functional.softplus(-real_logits.float()).mean()
