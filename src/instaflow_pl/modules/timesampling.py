"""Distributions of the reflow time t in (0, 1)."""

from __future__ import annotations

import math

import torch

from instaflow_pl.errors import UserError

T_DISTRIBUTIONS = ("uniform", "logit_normal", "u_shaped")
"""``uniform`` (InstaFlow), ``logit_normal`` (SD3), ``u_shaped`` (2-rectified flow++: more weight near 0 and 1)."""


def sample_t(
    name: str, batch: int, device: torch.device | str = "cpu", loc: float = 0.0, scale: float = 1.0, a: float = 4.0
) -> torch.Tensor:
    """Draw ``batch`` times from distribution ``name`` (global torch RNG, so ``seed_everything`` fixes them).

    Args:
        name: One of ``T_DISTRIBUTIONS``.
        batch: How many.
        device: Where.
        loc: Mean of the normal under the logit (``logit_normal``).
        scale: Its standard deviation.
        a: Sharpness of the U: density proportional to ``cosh(a (t - 1/2))`` (``u_shaped``).
    """
    if name == "uniform":
        return torch.rand(batch, device=device)
    if name == "logit_normal":
        return torch.sigmoid(loc + scale * torch.randn(batch, device=device))
    if name == "u_shaped":
        # Density proportional to cosh(a (t - 1/2)): an even mixture of a rising exponential (inverse CDF below)
        # and its mirror image.
        rising = torch.log1p(torch.rand(batch, device=device) * math.expm1(a)) / a
        mirror = torch.rand(batch, device=device) < 0.5
        return torch.where(mirror, 1.0 - rising, rising)
    raise UserError(f"unknown t distribution {name!r}: choose one of {', '.join(T_DISTRIBUTIONS)}")
