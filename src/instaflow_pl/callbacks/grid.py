"""Sample grid: decoded images for fixed prompts and noises, one row per step count."""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from PIL import Image

from instaflow_pl.callbacks.images import log_image, to_pil_grid
from instaflow_pl.conventions import latents_to_images, noise_for_indices


class SampleGrid(L.Callback):
    """Draws the model's samples for fixed prompts and noises after validation: one row per step count.

    Args:
        prompts: The prompts (one column each).
        steps: Euler step counts (one row each).
        guidance: Classifier-free guidance of the samples.
        seed: Noise of column i comes from ``seed + i`` (the project's seed rule).
        every_n_epochs: Draw after every n-th validation epoch.
    """

    def __init__(
        self,
        prompts: Sequence[str] = ("a photo of a cat", "a red car in the city", "a painting of a horse"),
        steps: Sequence[int] = (1, 2, 4, 25),
        guidance: float = 1.0,
        seed: int = 0,
        every_n_epochs: int = 1,
    ):
        self.prompts = list(prompts)
        self.steps = [int(s) for s in steps]
        self.guidance = guidance
        self.seed = seed
        self.every_n_epochs = every_n_epochs
        self._vae = None

    def _vae_of(self, pl_module) -> torch.nn.Module | None:
        if self._vae is None:
            self._vae = module_vae(pl_module) or False
        return self._vae.to(pl_module.device) if self._vae is not False else None

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Sample, decode and log the grid (rank zero; the module's train/eval mode is restored)."""
        if trainer.sanity_checking or (trainer.current_epoch % self.every_n_epochs):
            return
        log_image(trainer, "val/samples", self.draw(pl_module), caption=f"rows: {self.steps} Euler steps")

    @torch.no_grad()
    def draw(self, pl_module) -> Image.Image:
        """The grid as a picture."""
        was_training = pl_module.training
        pl_module.eval()
        try:
            shape = latent_shape_of(pl_module)
            x0 = noise_for_indices(self.seed, range(len(self.prompts)), shape).to(pl_module.device)
            rows = [pl_module.sample(x0, self.prompts, n, self.guidance).x for n in self.steps]
            latents = torch.cat(rows)
            vae = self._vae_of(pl_module)
            images = latents_to_images(vae, latents) if vae is not None else latents
            return to_pil_grid(images, rows=len(self.steps))
        finally:
            pl_module.train(was_training)


def latent_shape_of(pl_module) -> tuple[int, int, int]:
    """(C, H, W) the module's velocity works on: from its UNet config, or from the validation data."""
    network = getattr(pl_module.velocity, "network", None)
    if network is not None:
        from instaflow_pl.families import latent_geometry

        return latent_geometry(network).shape
    manifest = getattr(pl_module.trainer.datamodule, "manifest", None)
    if manifest is None:
        raise ValueError("cannot tell the latent shape: the velocity has no UNet and the data no manifest")
    return tuple(manifest.latent_shape)


def module_vae(pl_module) -> torch.nn.Module | None:
    """The VAE that decodes a module's latents: its own (image encoding, LPIPS), else its base model's, else None."""
    if getattr(pl_module, "vae", None) is not None:
        return pl_module.vae
    lpips = getattr(getattr(pl_module, "distance", None), "lpips", None)
    if lpips is not None:
        return lpips.vae
    return load_vae(pl_module.hparams.get("base_model"))


def load_vae(folder: str | None):
    """The VAE of a model folder, or None when it has none (a setting where latent = image)."""
    if not folder:
        return None
    from instaflow_pl.model_folder import ModelFolder

    model = ModelFolder.open(folder)
    return model.load_vae() if model.vae_config is not None else None
