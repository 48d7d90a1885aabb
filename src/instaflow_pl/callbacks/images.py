"""Getting pictures out of a run: to W&B as ``wandb.Image`` when it is a logger, and always as PNG files."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image


def run_folder(trainer: L.Trainer) -> Path:
    """Where a run's files go: the logger's folder, else ``default_root_dir``.

    Not ``trainer.log_dir``: that is a collective (a broadcast), and drawing callbacks run on rank zero only, where
    a collective would wait for the other ranks forever.
    """
    logger = trainer.logger
    folder = (getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)) if logger is not None else None
    return Path(folder or trainer.default_root_dir)


def log_image(trainer: L.Trainer, key: str, image: Image.Image, caption: str | None = None) -> Path:
    """Log ``image`` under ``key`` to every logger that takes images and save it as a PNG in the run folder.

    Returns:
        The PNG's path (``<run>/images/<key>_step<N>.png``; never overwrites an earlier step's file).
    """
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[image], step=trainer.global_step, **extra)
    folder = run_folder(trainer) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key.replace('/', '_')}_step{trainer.global_step:07d}.png"
    image.save(path)
    return path


def to_pil_grid(images: torch.Tensor, rows: int) -> Image.Image:
    """Images (N, C, H, W) in [-1, 1] laid out in ``rows`` rows, as an RGB picture."""
    images = images.detach().float().cpu().clamp(-1, 1).add(1).div(2)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    elif images.shape[1] != 3:  # latents without a VAE: show the first three channels, rescaled per image
        images = images[:, :3]
        low = images.amin(dim=(1, 2, 3), keepdim=True)
        images = (images - low) / (images.amax(dim=(1, 2, 3), keepdim=True) - low).clamp_min(1e-8)
    n, c, h, w = images.shape
    cols = -(-n // rows)
    grid = torch.ones(c, rows * h, cols * w)
    for k in range(n):
        r, col = divmod(k, cols)
        grid[:, r * h : (r + 1) * h, col * w : (col + 1) * w] = images[k]
    return Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def figure_to_pil(figure) -> Image.Image:
    """A matplotlib figure as a picture (the figure is closed)."""
    import matplotlib.pyplot as plt

    figure.canvas.draw()
    image = Image.fromarray(np.asarray(figure.canvas.buffer_rgba())[..., :3].copy())
    plt.close(figure)
    return image
