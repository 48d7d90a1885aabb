"""Latent geometry: the latents a network takes (channels, native size, which sizes fit)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LatentGeometry:
    """The latents a network takes.

    Attributes:
        channels: Latent channels.
        size: Native height and width.
        down_factor: Height and width must be multiples of this (0: only the native size fits).
    """

    channels: int
    size: int
    down_factor: int

    @property
    def shape(self) -> tuple[int, int, int]:
        """The native (C, H, W)."""
        return (self.channels, self.size, self.size)

    def fits(self, shape: tuple[int, ...] | list[int]) -> bool:
        """Whether latents of (C, H, W) ``shape`` can go through the network."""
        if len(shape) != 3 or shape[0] != self.channels or min(shape[1:]) <= 0:
            return False
        if self.down_factor == 0:  # a fixed-size network (e.g. an MLP on flattened latents)
            return tuple(shape[1:]) == (self.size, self.size)
        return not (shape[1] % self.down_factor or shape[2] % self.down_factor)

    def describe(self) -> str:
        """What fits, in words."""
        if self.down_factor == 0:
            return f"exactly {list(self.shape)}"
        return f"[{self.channels}, H, W] with H and W multiples of {self.down_factor}"
