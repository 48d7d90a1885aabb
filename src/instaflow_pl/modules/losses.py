"""Distances between a one-step student's output and the teacher's X1: l2, pseudo-Huber, LPIPS, weighted sums."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from instaflow_pl.conventions import latents_to_images
from instaflow_pl.errors import UserError

LPIPS_BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
"""torchvision weight files LPIPS's backbones load from ``$TORCH_HOME/hub/checkpoints``."""


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.float().flatten(1)


def l2_distance(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample, shape (B,)."""
    return (_flat(pred) - _flat(target)).pow(2).mean(dim=1)


def pseudo_huber_distance(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """``sqrt(||d||^2 / n + c^2) - c`` per sample (n = elements per sample): l2-like near 0, l1-like far away."""
    return torch.sqrt((_flat(pred) - _flat(target)).pow(2).mean(dim=1) + c * c) - c


def lpips_backbone_path(net: str) -> Path:
    """Where torchvision looks for LPIPS's ``net`` backbone weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / LPIPS_BACKBONE_FILES[net]


class LPIPSDistance(nn.Module):
    """LPIPS between VAE-decoded images (the paper's distillation loss), frozen.

    Args:
        vae: The frozen VAE that decodes latents (latents are divided by its scaling factor first).
        net: ``vgg`` or ``alex``.
        pretrained: Load the backbone's ImageNet weights (they must be in ``$TORCH_HOME/hub/checkpoints``);
            False gives random backbone weights (``pnet_rand``), for tests only.
    """

    def __init__(self, vae: nn.Module, net: str = "vgg", pretrained: bool = True):
        super().__init__()
        import lpips

        if net not in LPIPS_BACKBONE_FILES:
            raise UserError(f"unknown LPIPS net {net!r}: choose one of {', '.join(LPIPS_BACKBONE_FILES)}")
        if pretrained and not lpips_backbone_path(net).is_file():
            raise UserError(
                f"LPIPS needs {lpips_backbone_path(net)} (torchvision's {net} ImageNet weights); copy the file there "
                "or set TORCH_HOME to a folder whose hub/checkpoints/ holds it"
            )
        self.vae = vae.requires_grad_(False).eval()
        self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained, verbose=False)
        self.lpips.requires_grad_(False).eval()

    MIN_SIZE = 64
    """Images smaller than this are upsampled first: the LPIPS backbones downsample too far for tiny images."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents (at least ``MIN_SIZE`` pixels high and wide)."""
        images = latents_to_images(self.vae, latents).clamp(-1, 1)
        if min(images.shape[-2:]) < self.MIN_SIZE:
            factor = -(-self.MIN_SIZE // min(images.shape[-2:]))
            images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="bilinear")
        return images

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS per sample, shape (B,)."""
        with torch.no_grad():
            target_images = self.decode(target)
        return self.lpips(self.decode(pred), target_images).flatten()


class Distance(nn.Module):
    """A weighted sum of distances, e.g. ``{"l2": 1.0}`` or ``{"huber": 1.0, "lpips": 0.5}``.

    Args:
        weights: Distance name (``l2``, ``huber``, ``lpips``) to weight.
        huber_c: The constant ``c`` of the pseudo-Huber distance.
        lpips: The LPIPS distance, required when ``lpips`` has a weight.
    """

    NAMES = ("l2", "huber", "lpips")

    def __init__(self, weights: dict[str, float], huber_c: float = 0.001, lpips: LPIPSDistance | None = None):
        super().__init__()
        unknown = sorted(set(weights) - set(self.NAMES))
        if unknown or not weights:
            raise UserError(f"unknown distance {unknown or '{}'}: use weights over {', '.join(self.NAMES)}")
        if "lpips" in weights and lpips is None:
            raise ValueError("an LPIPSDistance is needed for the lpips weight")
        if huber_c <= 0:
            raise UserError(f"huber_c must be > 0, got {huber_c}")
        self.weights = dict(weights)
        self.huber_c = huber_c
        self.lpips = lpips

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Each weighted term per sample, plus ``total``."""
        terms: dict[str, torch.Tensor] = {}
        for name, weight in self.weights.items():
            if name == "l2":
                value = l2_distance(pred, target)
            elif name == "huber":
                value = pseudo_huber_distance(pred, target, self.huber_c)
            else:
                value = self.lpips(pred, target)
            terms[name] = weight * value
        terms["total"] = torch.stack(list(terms.values())).sum(dim=0)
        return terms
