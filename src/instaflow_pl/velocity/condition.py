"""Conditioning that travels with a batch: what the prompts became, and the null (empty-prompt) condition."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch


@dataclass
class TextCondition:
    """Text conditioning of a batch, in whatever parts a model family needs.

    Every tensor has the batch first. Stable Diffusion 1.x/2.x uses ``embeds`` only; SDXL and SD3 add ``pooled``;
    a guidance-distilled network (FLUX.1 [dev]) also takes ``guidance`` (see :mod:`instaflow_pl.families`, where each
    family says how its network takes these parts).

    Attributes:
        embeds: Token embeddings, (B, L, D): the text encoder's hidden states (SDXL: CLIP-L and CLIP-G joined;
            SD3: both CLIPs, padded to T5's width, followed by the T5 tokens).
        pooled: Pooled prompt embedding, (B, P), for families that take one (SDXL: CLIP-G's; SD3: both CLIPs';
            Flux: CLIP-L's).
        guidance: The value of the network's guidance input, (B,) float32, for guidance-distilled networks
            (FLUX.1 [dev]: a teacher's guidance scale, or the value a reflowed student keeps); None for the others.
        null: The condition of the null prompt (batch 1), needed for classifier-free guidance.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    guidance: torch.Tensor | None = None
    null: TextCondition | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def parts(self) -> dict[str, torch.Tensor]:
        """The tensors this condition holds, by field name (the null condition is not one of them)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "null"}
        return {name: value for name, value in out.items() if value is not None}

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TextCondition:
        """A condition whose tensors are ``fn`` of these (the null condition is carried along, mapped too)."""
        null = None if self.null is None else self.null.map(fn)
        return TextCondition(**{name: fn(value) for name, value in self.parts().items()}, null=null)

    def rows(self, index: int | slice | torch.Tensor) -> TextCondition:
        """The condition of some samples of the batch (``index`` as in tensor indexing; keeps a batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return TextCondition(**{name: value[index] for name, value in self.parts().items()}, null=self.null)

    @staticmethod
    def stack(rows: list[TextCondition], null: TextCondition | None = None) -> TextCondition:
        """Join batches of conditions (all of the same kind) along the batch."""
        parts = [row.parts() for row in rows]
        return TextCondition(**{name: torch.cat([p[name] for p in parts]) for name in parts[0]}, null=null)

    def with_null(self, null: TextCondition | None) -> TextCondition:
        """The same condition with ``null`` as its null condition."""
        return TextCondition(**self.parts(), null=null)

    def with_guidance(self, value: float | None) -> TextCondition:
        """The same condition, its null condition too, with ``value`` as every sample's guidance input (None: no
        guidance input)."""

        def parts(cond: TextCondition) -> dict[str, torch.Tensor]:
            out = {name: tensor for name, tensor in cond.parts().items() if name != "guidance"}
            if value is not None:
                out["guidance"] = torch.full((len(cond),), float(value), device=cond.embeds.device)
            return out

        null = None if self.null is None else TextCondition(**parts(self.null))
        return TextCondition(**parts(self), null=null)

    def unconditional(self) -> TextCondition:
        """The same batch conditioned on the null prompt."""
        if self.null is None:
            raise ValueError("this TextCondition has no null condition; encode it with with_null=True for guidance")
        size = len(self)
        return TextCondition(
            **{name: value.expand(size, *value.shape[1:]) for name, value in self.null.parts().items()}, null=self.null
        )

    def concat(self, other: TextCondition) -> TextCondition:
        """Stack two conditions along the batch (self first)."""
        return TextCondition.stack([self, other], null=self.null)
