"""Stable Diffusion XL: two CLIP towers (penultimate states joined), CLIP-G's pooled embedding and the size ids."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from instaflow_pl.families.base import Family
from instaflow_pl.solver.scheduler import SCHEDULERS
from instaflow_pl.text import PromptEncoder, clip_states
from instaflow_pl.velocity.condition import TextCondition


class SDXLPromptEncoder(PromptEncoder):
    """SDXL's prompt encoding, as ``StableDiffusionXLPipeline.encode_prompt``: the penultimate hidden states of CLIP-L
    and CLIP-G joined along the width, and CLIP-G's projected (pooled) embedding.

    Args:
        tokenizers: CLIP-L's and CLIP-G's tokenizers.
        text_encoders: CLIP-L (``CLIPTextModel``) and CLIP-G (``CLIPTextModelWithProjection``).
        zero_null: The null condition is zeros (the folder's ``force_zeros_for_empty_prompt``, true for SDXL base).
        cache_mb: Memory for cached conditions (see :class:`~instaflow_pl.text.PromptEncoder`).
    """

    def __init__(self, tokenizers, text_encoders, zero_null: bool = True, cache_mb: float = 0.0):
        super().__init__(cache_mb=cache_mb, zero_null=zero_null)
        self.tokenizer, self.tokenizer_2 = tokenizers
        self.text_encoder, self.text_encoder_2 = text_encoders
        self.freeze()

    def encode_batch(self, prompts: list[str]) -> TextCondition:
        """(B, 77, D_L + D_G) token states and the (B, P) pooled CLIP-G embedding."""
        states_l, _ = clip_states(self, self.tokenizer, self.text_encoder, prompts, layer=-2)
        states_g, pooled = clip_states(self, self.tokenizer_2, self.text_encoder_2, prompts, layer=-2)
        return TextCondition(torch.cat([states_l, states_g], dim=-1), pooled=pooled)


def time_ids(x: torch.Tensor, pixels_per_latent: int) -> torch.Tensor:
    """SDXL's micro-conditioning for latents ``x``, as diffusers sets it by default: original size = target size =
    the image size, crop (0, 0); one row (height, width, 0, 0, height, width) per sample."""
    height, width = (int(s) * pixels_per_latent for s in x.shape[-2:])
    row = torch.tensor([[height, width, 0, 0, height, width]], dtype=x.dtype, device=x.device)
    return row.expand(x.shape[0], 6)


class StableDiffusionXL(Family):
    """Stable Diffusion XL (base). The size ids are computed from the latents' size at each call, so one prompt
    encoding serves every resolution."""

    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    text_parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    default_classes: ClassVar[dict[str, tuple[str, str]]] = {
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
    }
    teacher_solvers = tuple(SCHEDULERS)
    default_teacher_solver = "dpm++"
    lora_pipeline = "StableDiffusionXLPipeline"
    standalone_pipeline = True
    pipeline_file_in_index = False  # StableDiffusionXLPipeline.from_pretrained(DIR) still loads the parts
    pipeline_config = ("force_zeros_for_empty_prompt",)
    network_classes = (("diffusers", "UNet2DConditionModel"),)
    shard_blocks = ("ResnetBlock2D", "BasicTransformerBlock")
    fixture = "instaflow_pl.families.sdxl_tiny"

    def owns_network_config(self, config: Mapping[str, Any]) -> bool:
        """A ``UNet2DConditionModel`` with SDXL's added text-and-time embedding."""
        return super().owns_network_config(config) and config.get("addition_embed_type") == "text_time"

    def network_inputs(
        self, network: nn.Module, x: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> dict[str, Any]:
        """The joined CLIP states, and ``added_cond_kwargs``: CLIP-G's pooled embedding and the size ids."""
        if cond.pooled is None:
            raise ValueError("an SDXL UNet needs the pooled CLIP-G embedding; encode prompts with the SDXL encoder")
        added = {"text_embeds": cond.pooled, "time_ids": time_ids(x, pixels_per_latent)}
        return {"encoder_hidden_states": cond.embeds, "added_cond_kwargs": added}

    def encoder_from_parts(
        self, parts: dict[str, Any], index: dict[str, Any], network_config: dict[str, Any], cache_mb: float = 0.0
    ):
        """An :class:`SDXLPromptEncoder` (zeros for the null prompt unless the folder says otherwise)."""
        zero_null = bool(index.get("force_zeros_for_empty_prompt", True))
        tokenizers = (parts["tokenizer"], parts["tokenizer_2"])
        encoders = (parts["text_encoder"], parts["text_encoder_2"])
        return SDXLPromptEncoder(tokenizers, encoders, zero_null=zero_null, cache_mb=cache_mb)
