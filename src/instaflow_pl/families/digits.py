"""The digits demo's family: a pixel-space residual MLP velocity (no VAE: latent = image) with a tiny CLIP text tower.

Its folders are velocity folders only (the demo trains its 1-RF from data), sampled by the Euler LatentODE like
every k-RF. Folders and records written before this family existed named it ``sd``; they still load as digits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from instaflow_pl.families.base import Family
from instaflow_pl.families.geometry import LatentGeometry
from instaflow_pl.families.sd import ClipPromptEncoder
from instaflow_pl.velocity.condition import TextCondition


class Digits(Family):
    """The digits demo's pixel-space MLP (``MLPVelocityNet``) with one CLIP text tower."""

    name = "digits"
    title = "digits demo"
    pipeline_classes = ()
    network_classes = (("instaflow_pl.velocity.mlp", "MLPVelocityNet"),)
    uses_vae = False
    legacy_names = ("sd",)
    text_parts = ("tokenizer", "text_encoder")
    default_classes: ClassVar[dict[str, tuple[str, str]]] = {
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "text_encoder": ("transformers", "CLIPTextModel"),
    }
    teacher_solvers = ()
    default_teacher_solver = "euler"
    lora_pipeline = "StableDiffusionPipeline"
    fixture = "instaflow_pl.families.digits_tiny"
    card_steps_note = (
        "The network is instaflow-pl's pixel-space `MLPVelocityNet` (no VAE: the latents are the images), sampled by",
        "the project's Euler LatentODE: t = 0 is noise, t = 1 is data, the network is called at timestep",
        "`(1 - t) * 1000` and returns the velocity (data - noise).",
    )

    def card_stock_use(self, steps: int) -> list[str]:
        """Stock diffusers cannot load the MLP network: instaflow-pl samples it."""
        return ["Stock diffusers cannot load this network (instaflow-pl's `MLPVelocityNet`); use instaflow-pl below."]

    def latent_geometry(self, config: Mapping[str, Any]) -> LatentGeometry:
        """Exactly ``in_channels x sample_size x sample_size``: the MLP works on flattened pixels."""
        return LatentGeometry(int(config["in_channels"]), int(config["sample_size"]), 0)

    def network_inputs(
        self, network: nn.Module, x: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> dict[str, Any]:
        """``encoder_hidden_states``: the CLIP hidden states."""
        return {"encoder_hidden_states": cond.embeds}

    def encoder_from_parts(
        self, parts: dict[str, Any], index: dict[str, Any], network_config: dict[str, Any], cache_mb: float = 0.0
    ):
        """A :class:`~instaflow_pl.families.sd.ClipPromptEncoder`."""
        return ClipPromptEncoder(parts["tokenizer"], parts["text_encoder"], cache_mb)
