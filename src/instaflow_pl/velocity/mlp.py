"""A small residual-MLP velocity network with the calling convention of a diffusers UNet (for the digits demo).

A diffusers UNet is far too slow to train on a laptop CPU. This network takes the same inputs as
``UNet2DConditionModel`` (``sample``, diffusers ``timestep``, ``encoder_hidden_states``) and is a diffusers
``ModelMixin``/``ConfigMixin``, so it is saved to and loaded from the ``unet/`` subfolder of a model folder and goes
through exactly the code an SD UNet goes through (NetworkVelocity, teachers, training modules, export).
"""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features (B, dim) of diffusers timesteps (0 to 1000), as in the diffusers UNet."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timestep.device, dtype=torch.float32) / half)
    angles = timestep.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResidualBlock(nn.Module):
    """``h + W2 SiLU(W1 LayerNorm(h) + e)``: a pre-norm MLP block to which the time/condition embedding is added."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """One residual update."""
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h)) + emb))


class MLPVelocityNet(ModelMixin, ConfigMixin):
    """A residual MLP on flattened latents, conditioned on time and on a pooled text embedding.

    Called like a diffusers UNet: ``net(sample, timestep, encoder_hidden_states, return_dict=False)[0]`` with
    ``timestep`` in diffusers units (``(1 - t) * 1000`` for a rectified flow) and ``encoder_hidden_states`` the
    text encoder's (B, L, D) states, all L of them flattened into one conditioning vector (so the word that differs
    between two prompts reaches the network directly rather than diluted by pooling).

    Args:
        in_channels: Latent channels (1 for grey digits in pixel space).
        sample_size: Latent height and width.
        width: Hidden width.
        num_blocks: Residual blocks.
        cross_attention_dim: Width D of the text embedding.
        text_tokens: Its length L (the tokenizer's ``model_max_length``).
        time_embed_dim: Size of the sinusoidal time features.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        in_channels: int = 1,
        sample_size: int = 8,
        width: int = 256,
        num_blocks: int = 4,
        cross_attention_dim: int = 32,
        text_tokens: int = 16,
        time_embed_dim: int = 128,
    ):
        super().__init__()
        size = in_channels * sample_size * sample_size
        self.proj_in = nn.Linear(size, width)
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, width), nn.SiLU(), nn.Linear(width, width))
        text = cross_attention_dim * text_tokens
        self.cond_mlp = nn.Sequential(nn.LayerNorm(text), nn.Linear(text, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ResidualBlock(width) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(width)
        self.proj_out = nn.Linear(width, size)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor] | dict[str, torch.Tensor]:
        """The network's output for latents ``sample`` (B, C, H, W) at diffusers ``timestep`` (scalar or (B,))."""
        batch = sample.shape[0]
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.expand(batch) if timestep.dim() == 0 else timestep
        emb = self.time_mlp(timestep_embedding(timestep, self.config.time_embed_dim).to(sample.dtype))
        expected = (self.config.text_tokens, self.config.cross_attention_dim)
        if tuple(encoder_hidden_states.shape[1:]) != expected:
            raise ValueError(
                f"MLPVelocityNet takes text states of shape (B, {expected[0]}, {expected[1]}), got "
                f"{tuple(encoder_hidden_states.shape)}: use the tokenizer and text encoder of its model folder"
            )
        emb = emb + self.cond_mlp(encoder_hidden_states.flatten(1))
        h = self.proj_in(sample.reshape(batch, -1)) + emb
        for block in self.blocks:
            h = block(h, emb)
        out = self.proj_out(nn.functional.silu(self.norm_out(h))).reshape(sample.shape)
        return {"sample": out} if return_dict else (out,)
