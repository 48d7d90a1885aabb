"""Conditioning that travels with a batch: prompt embeddings and the null (empty-prompt) embedding."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextCondition:
    """Text conditioning of a batch.

    Attributes:
        embeds: Prompt embeddings, shape (B, L, D).
        null: Embedding of the empty prompt "", shape (1, L, D); needed for classifier-free guidance.
    """

    embeds: torch.Tensor
    null: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def unconditional(self) -> TextCondition:
        """The same batch conditioned on the null prompt."""
        if self.null is None:
            raise ValueError("this TextCondition has no null embedding; encode it with with_null=True for guidance")
        return TextCondition(self.null.expand_as(self.embeds), self.null)

    def concat(self, other: TextCondition) -> TextCondition:
        """Stack two conditions along the batch (self first)."""
        return TextCondition(torch.cat([self.embeds, other.embeds]), self.null)
