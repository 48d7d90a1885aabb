"""Velocities and predictors built on a UNet-like network (a diffusers ``UNet2DConditionModel`` or the demo MLP)."""

from __future__ import annotations

import torch
from torch import nn

from instaflow_pl.conventions import unet_timestep
from instaflow_pl.velocity.condition import TextCondition


class UNetPredictor(nn.Module):
    """A diffusers UNet (or a network with its calling convention) called as ``f(x, timestep, cond)``.

    This is how a Stable Diffusion teacher (epsilon- or v-prediction) is evaluated inside its scheduler. Inputs are
    cast to the UNet's dtype and the output is returned in float32, so solvers step in full precision.

    Args:
        unet: The UNet, or any network from :mod:`instaflow_pl.velocity.networks`.
    """

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Evaluate the UNet at diffusers ``timestep`` (scalar or per sample)."""
        dtype = next(self.unet.parameters()).dtype  # (ModelMixin.dtype walks every module)
        out = self.unet(x.to(dtype), timestep, encoder_hidden_states=cond.embeds.to(dtype), return_dict=False)[0]
        return out.float()


class UNetVelocity(UNetPredictor):
    """The velocity ``v(x, t, cond)`` of a rectified flow whose network is a diffusers UNet.

    Flow time ``t`` (0 = noise, 1 = data) is given to the UNet as timestep ``(1 - t) * 1000`` and the UNet's output
    is the velocity itself.

    Args:
        unet: The UNet-like network (initialised from a Stable Diffusion teacher or a k-rectified flow).
    """

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """Evaluate the velocity at flow time ``t`` (scalar or per sample)."""
        return super().forward(x, unet_timestep(t), cond)


class PretrainedUNetVelocity(UNetVelocity):
    """A UNet velocity initialised from a diffusers-format folder (an SD teacher or an exported k-RF).

    Args:
        folder: Model folder holding ``unet/``.
        subfolder: Subfolder of the UNet.
        gradient_checkpointing: Trade compute for memory (for SD-size UNets).
    """

    def __init__(self, folder: str, subfolder: str = "unet", gradient_checkpointing: bool = False):
        from instaflow_pl.teachers.folder import resolve_model_folder
        from instaflow_pl.velocity.networks import load_network

        unet = load_network(resolve_model_folder(folder), subfolder=subfolder)
        if gradient_checkpointing:
            if unet._supports_gradient_checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"{type(unet).__name__} has no gradient checkpointing; training without it")
        super().__init__(unet)
        self.folder = str(folder)
