"""A velocity initialised from a model folder: a released teacher's network or an exported k-RF's."""

from __future__ import annotations

from pathlib import Path

from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.velocity.network import NetworkVelocity


class PretrainedVelocity(NetworkVelocity):
    """A velocity initialised from a diffusers-format folder (a released teacher or an exported k-RF).

    Args:
        folder: Model folder (or hub id, or an opened :class:`~instaflow_pl.model_folder.ModelFolder`); its family
            says where the network is (``unet/`` or ``transformer/``) and how it is called.
        gradient_checkpointing: Trade compute for memory (for SD-size networks).
    """

    def __init__(self, folder: str | Path | ModelFolder, gradient_checkpointing: bool = False):
        model = folder if isinstance(folder, ModelFolder) else ModelFolder.open(folder)
        network = model.load_network()
        if gradient_checkpointing:
            if network._supports_gradient_checkpointing:
                network.enable_gradient_checkpointing()
            else:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(f"{type(network).__name__} has no gradient checkpointing; training without it")
        super().__init__(network, model.family, pixels_per_latent=model.pixels_per_latent)
        self.folder = model.source
