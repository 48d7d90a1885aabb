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


LPIPS_DTYPES = ("fp32", "bf16")
CHECKPOINTED_LAYERS = ("ResnetBlock2D", "Attention", "Upsample2D", "UNetMidBlock2D")
"""The decoder layers that LPIPS checkpointing recomputes (by class name; the mid block counts as one)."""


def checkpoint_layers(network: nn.Module, names: tuple[str, ...]) -> int:
    """Make every submodule of ``network`` whose class is named in ``names`` (outermost first) run under
    gradient checkpointing when grad is enabled; return how many were wrapped."""
    from torch.utils.checkpoint import checkpoint

    def wrap(forward):
        def run(*args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)
            return forward(*args, **kwargs)

        return run

    count = 0
    skip: set[int] = set()  # inside a wrapped layer: already recomputed as part of it
    for module in network.modules():
        if id(module) in skip or type(module).__name__ not in names:
            continue
        module.forward = wrap(module.forward)
        skip.update(id(m) for m in module.modules())
        count += 1
    return count


class LPIPSDistance(nn.Module):
    """LPIPS between VAE-decoded images (the paper's distillation loss), frozen.

    The teacher's X1 is decoded without grad; only the student's path keeps activations for the backward pass, and
    the options below shrink them (at 512 px they dominate a distillation step's memory).

    Args:
        vae: The frozen VAE that decodes latents (latents are divided by its scaling factor first).
        net: ``vgg`` or ``alex``.
        pretrained: Load the backbone's ImageNet weights (they must be in ``$TORCH_HOME/hub/checkpoints``);
            False gives random backbone weights (``pnet_rand``), for tests only.
        checkpointing: Gradient checkpointing of the VAE decoder on the student's path: each of its resnet,
            attention and upsampling layers keeps only its input and runs again in the backward pass (same loss and
            gradients). Finer than diffusers' per-block checkpointing, whose largest block at 512 px still holds
            about 2 GB of activations while it is recomputed.
        dtype: ``fp32`` or ``bf16``: the dtype the VAE decodes and LPIPS runs in (bf16 halves their weights and
            activations; the loss changes by bf16 rounding).
        resize: Resize decoded images to this side before the LPIPS net (e.g. 224, as 2-rectified flow++ does);
            null keeps the decoded size. Changes the loss (a coarser comparison) and saves the LPIPS net's memory.
    """

    def __init__(
        self,
        vae: nn.Module,
        net: str = "vgg",
        pretrained: bool = True,
        checkpointing: bool = False,
        dtype: str = "fp32",
        resize: int | None = None,
    ):
        super().__init__()
        import lpips

        if net not in LPIPS_BACKBONE_FILES:
            raise UserError(f"unknown LPIPS net {net!r}: choose one of {', '.join(LPIPS_BACKBONE_FILES)}")
        if dtype not in LPIPS_DTYPES:
            raise UserError(f"lpips_dtype must be one of {', '.join(LPIPS_DTYPES)}, got {dtype!r}")
        from instaflow_pl.dtypes import DTYPES

        if resize is not None and resize < 16:
            raise UserError(f"lpips_resize must be >= 16 pixels (or null), got {resize}")
        if pretrained and not lpips_backbone_path(net).is_file():
            raise UserError(
                f"LPIPS needs {lpips_backbone_path(net)} (torchvision's {net} ImageNet weights); copy the file there "
                "or set TORCH_HOME to a folder whose hub/checkpoints/ holds it"
            )
        self.dtype = DTYPES[dtype]
        self.resize = resize
        self.vae = vae.requires_grad_(False).eval().to(self.dtype)
        self.checkpointed = checkpoint_layers(self.vae.decoder, CHECKPOINTED_LAYERS) if checkpointing else 0
        self.lpips = lpips.LPIPS(net=net, pretrained=True, pnet_rand=not pretrained, verbose=False)
        self.lpips.requires_grad_(False).eval().to(self.dtype)

    MIN_SIZE = 64
    """Images smaller than this are upsampled first: the LPIPS backbones downsample too far for tiny images."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents, at ``resize`` pixels when set (else at least ``MIN_SIZE``)."""
        images = latents_to_images(self.vae, latents.to(self.dtype)).clamp(-1, 1)
        side = min(images.shape[-2:])
        if self.resize is not None and side != self.resize:
            images = torch.nn.functional.interpolate(  # antialiased resizing has no bf16 kernel on CPUs
                images.float(), size=(self.resize, self.resize), mode="bilinear", antialias=True, align_corners=False
            ).to(images.dtype)
        elif side < self.MIN_SIZE:
            factor = -(-self.MIN_SIZE // side)
            images = torch.nn.functional.interpolate(images, scale_factor=factor, mode="bilinear")
        return images

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """LPIPS per sample, shape (B,), in float32."""
        with torch.no_grad():
            target_images = self.decode(target)
        return self.lpips(self.decode(pred), target_images).flatten().float()


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
