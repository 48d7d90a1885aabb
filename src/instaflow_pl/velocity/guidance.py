"""Classifier-free guidance: the one wrapper used around every model (velocity or epsilon alike)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from instaflow_pl.errors import UserError


def _double(t: torch.Tensor) -> torch.Tensor:
    return t if t.ndim == 0 else torch.cat([t, t])


class ClassifierFreeGuidance(nn.Module):
    """``out = out_uncond + w (out_cond - out_uncond)``, both branches in one batched call.

    As in diffusers and the official InstaFlow code, ``w <= 1`` means no guidance: only the conditional branch is
    evaluated. The batch is laid out unconditional first, as diffusers' pipelines do.

    Args:
        model: Any ``f(x, t, cond)`` whose ``cond`` offers ``unconditional()`` and ``concat(other)``
            (e.g. :class:`~instaflow_pl.velocity.condition.TextCondition`).
        scale: The guidance weight ``w`` (>= 0).
    """

    def __init__(self, model: nn.Module, scale: float = 1.0):
        super().__init__()
        if scale < 0:
            raise UserError(f"guidance must be >= 0 (1 or less means no guidance), got {scale}")
        self.model = model
        self.scale = float(scale)
        self._paired: tuple[Any, Any] | None = None  # (cond, its uncond+cond batch), reused across solver steps

    @property
    def active(self) -> bool:
        """Whether the unconditional branch is evaluated."""
        return self.scale > 1.0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Evaluate the guided model."""
        if not self.active:
            return self.model(x, t, cond)
        if self._paired is None or self._paired[0] is not cond:
            self._paired = (cond, cond.unconditional().concat(cond))
        both = self.model(torch.cat([x, x]), _double(t), self._paired[1])
        uncond, conditional = both.chunk(2)
        return uncond + self.scale * (conditional - uncond)
