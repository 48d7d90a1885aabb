"""Velocities and predictors built on a family's denoising network (a diffusers UNet or transformer, or the digits
MLP). How the network is called is its family's business (:mod:`instaflow_pl.families`); a velocity initialised
from a model folder is :class:`~instaflow_pl.velocity.pretrained.PretrainedVelocity`."""

from __future__ import annotations

import torch
from torch import nn

from instaflow_pl.conventions import unet_timestep
from instaflow_pl.velocity.condition import TextCondition

DEFAULT_PIXELS_PER_LATENT = 8
"""The VAE downsampling of every released SD, SDXL and SD3 model (used when a folder does not say)."""


class NetworkPredictor(nn.Module):
    """A family's network called as ``f(x, timestep, cond)``, returning its raw output.

    This is how a diffusion teacher (epsilon- or v-prediction) is evaluated inside its scheduler. Inputs are cast to
    the network's dtype and the output is returned in float32, so solvers step in full precision.

    Args:
        network: The network (attribute ``network`` whatever its class, so checkpoints keep one layout).
        family: Its family (:func:`instaflow_pl.families.family_of_network` finds it from the network).
        pixels_per_latent: Image pixels per latent pixel (SDXL's size conditioning needs it).
    """

    guidance_as_input: bool = False
    """Guidance is this network's input, not two branches (a released guidance-distilled teacher; see
    :class:`~instaflow_pl.velocity.guidance.ClassifierFreeGuidance`)."""

    def __init__(self, network: nn.Module, family, pixels_per_latent: int = DEFAULT_PIXELS_PER_LATENT):
        super().__init__()
        self.network = network
        self.family = family
        self.pixels_per_latent = int(pixels_per_latent)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Evaluate the network at diffusers ``timestep`` (scalar or per sample)."""
        dtype = next(self.network.parameters()).dtype  # (ModelMixin.dtype walks every module)
        if cond.embeds.dtype != dtype:
            cond = cond.map(lambda v: v.to(dtype))
        return self.family.call(self.network, x.to(dtype), timestep, cond, self.pixels_per_latent).float()


class NetworkVelocity(NetworkPredictor):
    """The velocity ``v(x, t, cond)`` of a rectified flow built on a family's network.

    Flow time ``t`` (0 = noise, 1 = data) is given to the network as timestep ``(1 - t) * 1000``; the velocity is the
    network's output times the family's sign (+1 for UNets, whose reflowed output is the velocity; -1 for SD3, whose
    flow-matching output points from data to noise).

    Args:
        network: The network (initialised from a teacher or a k-rectified flow).
        family: Its family.
        pixels_per_latent: Image pixels per latent pixel.
    """

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Evaluate the velocity at flow time ``t`` (scalar or per sample)."""
        out = super().forward(x, unet_timestep(t), cond)
        return out if self.family.velocity_sign == 1.0 else self.family.velocity_sign * out
