"""Stable Diffusion 1.x / 2.x: one CLIP text tower, a ``UNet2DConditionModel`` taking its last hidden state."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from instaflow_pl.families.base import Family
from instaflow_pl.solver.scheduler import SCHEDULERS
from instaflow_pl.text import PromptEncoder, clip_states
from instaflow_pl.velocity.condition import TextCondition


class ClipPromptEncoder(PromptEncoder):
    """Stable Diffusion's prompt encoding: the CLIP text model's last hidden state, padded to 77 tokens.

    Args:
        tokenizer: A CLIP tokenizer (``model_max_length`` sets the length).
        text_encoder: A CLIP text model.
        cache_mb: Memory for cached conditions (see :class:`~instaflow_pl.text.PromptEncoder`).
    """

    def __init__(self, tokenizer, text_encoder: nn.Module, cache_mb: float = 0.0):
        super().__init__(cache_mb=cache_mb)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.freeze()

    @property
    def max_length(self) -> int:
        """Number of tokens every prompt is padded or truncated to."""
        return int(self.tokenizer.model_max_length)

    def encode_batch(self, prompts: list[str]) -> TextCondition:
        """The last hidden state of the CLIP text model, (B, 77, D)."""
        return TextCondition(clip_states(self, self.tokenizer, self.text_encoder, prompts)[0])


class StableDiffusion(Family):
    """Stable Diffusion 1.x and 2.x (and this project's exports of them): a ``UNet2DConditionModel`` without SDXL's
    added text-and-time embedding."""

    name = "sd"
    title = "Stable Diffusion"
    pipeline_classes = ("StableDiffusionPipeline", "InstaFlowPipeline")
    text_parts = ("tokenizer", "text_encoder")
    default_classes: ClassVar[dict[str, tuple[str, str]]] = {
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder": ("transformers", "CLIPTextModel"),
    }
    teacher_solvers = tuple(SCHEDULERS)
    default_teacher_solver = "dpm++"
    lora_pipeline = "StableDiffusionPipeline"
    standalone_pipeline = True
    network_classes = (("diffusers", "UNet2DConditionModel"),)
    shard_blocks = ("ResnetBlock2D", "BasicTransformerBlock")
    fixture = "instaflow_pl.families.sd_tiny"

    def owns_network_config(self, config: Mapping[str, Any]) -> bool:
        """A ``UNet2DConditionModel`` without SDXL's added text-and-time embedding."""
        return super().owns_network_config(config) and config.get("addition_embed_type") != "text_time"

    def network_inputs(
        self, network: nn.Module, x: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> dict[str, Any]:
        """``encoder_hidden_states``: the CLIP hidden states."""
        return {"encoder_hidden_states": cond.embeds}

    def encoder_from_parts(
        self, parts: dict[str, Any], index: dict[str, Any], network_config: dict[str, Any], cache_mb: float = 0.0
    ):
        """A :class:`ClipPromptEncoder`."""
        return ClipPromptEncoder(parts["tokenizer"], parts["text_encoder"], cache_mb)
