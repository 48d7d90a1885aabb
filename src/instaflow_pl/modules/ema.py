"""Exponential moving average of a model's weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """A frozen copy of a model whose weights follow ``ema = decay * ema + (1 - decay) * weights``.

    The first update copies the weights. Floating-point parameters and buffers are averaged in one fused call;
    integer buffers are copied. State-dict keys are ``module.*`` and ``n_averaged``.

    Args:
        model: The model to follow (copied).
        decay: The decay, in [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        self.module = copy.deepcopy(model).requires_grad_(False)
        self.decay = float(decay)
        self.register_buffer("n_averaged", torch.tensor(0, dtype=torch.long))
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None
        self._pairs_key: tuple | None = None

    def _tensor_pairs(self, model: nn.Module):
        ours = list(self.module.parameters()) + list(self.module.buffers())
        theirs = list(model.parameters()) + list(model.buffers())
        key = (id(model), len(theirs), *(t.data_ptr() for t in ours[:1] + theirs[:1]))
        if self._pairs is None or self._pairs_key != key:
            floats = [(a, b) for a, b in zip(ours, theirs, strict=True) if a.is_floating_point()]
            others = [(a, b) for a, b in zip(ours, theirs, strict=True) if not a.is_floating_point()]
            self._pairs = (
                [a for a, _ in floats],
                [b for _, b in floats],
                [a for a, _ in others],
                [b for _, b in others],
            )
            self._pairs_key = key
        return self._pairs

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s current weights."""
        ema_f, model_f, ema_o, model_o = self._tensor_pairs(model)
        if int(self.n_averaged) == 0:
            torch._foreach_copy_(ema_f, model_f)
        else:
            torch._foreach_lerp_(ema_f, model_f, 1.0 - self.decay)
        for a, b in zip(ema_o, model_o, strict=True):
            a.copy_(b)
        self.n_averaged += 1
