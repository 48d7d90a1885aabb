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

    Guidance-distilled networks (FLUX.1 [dev]) take a guidance value as an input (the condition's ``guidance``).
    A model whose attribute ``guidance_as_input`` is true (a released guidance-distilled teacher, set by its family)
    is guided as its diffusers pipeline guides it: ``w`` is its input and one branch is evaluated. With ``embedded``
    given, that is the input and ``w`` is true classifier-free guidance on top (diffusers' ``true_cfg_scale``). Other
    models (a reflowed student) take the input their condition carries and are guided by ``w`` as usual.

    Args:
        model: Any ``f(x, t, cond)`` whose ``cond`` offers ``unconditional()`` and ``concat(other)``
            (e.g. :class:`~instaflow_pl.velocity.condition.TextCondition`).
        scale: The guidance weight ``w`` (>= 0).
        embedded: The guidance input of a guidance-distilled network (None: the condition's, or ``w`` for a model
            with ``guidance_as_input``).
    """

    def __init__(self, model: nn.Module, scale: float = 1.0, embedded: float | None = None):
        super().__init__()
        if scale < 0:
            raise UserError(f"guidance must be >= 0 (1 or less means no guidance), got {scale}")
        if embedded is None and getattr(model, "guidance_as_input", False):
            embedded, scale = scale, 1.0
        self.model = model
        self.scale = float(scale)
        self.embedded = None if embedded is None else float(embedded)
        self._paired: tuple[Any, Any] | None = None  # (cond, its uncond+cond batch), reused across solver steps

    @property
    def active(self) -> bool:
        """Whether the unconditional branch is evaluated."""
        return self.scale > 1.0

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        """Evaluate the guided model."""
        if not self.active:
            return self.model(x, t, cond if self.embedded is None else cond.with_guidance(self.embedded))
        if self._paired is None or self._paired[0] is not cond:
            both = cond.unconditional().concat(cond)
            self._paired = (cond, both if self.embedded is None else both.with_guidance(self.embedded))
        both = self.model(torch.cat([x, x]), _double(t), self._paired[1])
        uncond, conditional = both.chunk(2)
        return uncond + self.scale * (conditional - uncond)
