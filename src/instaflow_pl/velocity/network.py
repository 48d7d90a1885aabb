"""Velocities and predictors built on a family's denoising network (a diffusers UNet or SD3 transformer, or the
demo's MLP). How the network is called is its family's business (:mod:`instaflow_pl.families`)."""

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
        family: Its family; None: found from the network.
        pixels_per_latent: Image pixels per latent pixel (SDXL's size conditioning needs it).
    """

    def __init__(self, network: nn.Module, family=None, pixels_per_latent: int = DEFAULT_PIXELS_PER_LATENT):
        super().__init__()
        from instaflow_pl.families import family_of_network

        self.network = network
        self.family = family if family is not None else family_of_network(network)
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
        family: Its family; None: found from the network.
        pixels_per_latent: Image pixels per latent pixel.
    """

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Evaluate the velocity at flow time ``t`` (scalar or per sample)."""
        out = super().forward(x, unet_timestep(t), cond)
        return out if self.family.velocity_sign == 1.0 else self.family.velocity_sign * out


class PretrainedVelocity(NetworkVelocity):
    """A velocity initialised from a diffusers-format folder (a released teacher or an exported k-RF).

    Args:
        folder: Model folder; its family says where the network is (``unet/`` or ``transformer/``).
        subfolder: Subfolder of the network (null: the family's).
        gradient_checkpointing: Trade compute for memory (for SD-size networks).
    """

    def __init__(self, folder: str, subfolder: str | None = None, gradient_checkpointing: bool = False):
        from instaflow_pl.families import family_of_folder, pixels_per_latent
        from instaflow_pl.teachers.folder import resolve_model_folder
        from instaflow_pl.velocity.networks import load_network

        root = resolve_model_folder(folder)
        family = family_of_folder(root)
        network = load_network(root, subfolder=subfolder or family.network_folder)
        if gradient_checkpointing:
            if network._supports_gradient_checkpointing:
                network.enable_gradient_checkpointing()
            else:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"{type(network).__name__} has no gradient checkpointing; training without it")
        super().__init__(network, family=family, pixels_per_latent=pixels_per_latent(root))
        self.folder = str(folder)
