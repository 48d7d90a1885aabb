"""The digits demo's family: a pixel-space residual MLP velocity (no VAE: latent = image) with a tiny CLIP text tower.

Its folders are velocity folders only (the demo trains its 1-RF from data), sampled by the Euler LatentODE like
every k-RF. Folders and records written before this family existed named it ``sd``; they still load as digits.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from instaflow_pl.families.base import Family
from instaflow_pl.families.geometry import LatentGeometry
from instaflow_pl.families.sd import StableDiffusion


class Digits(StableDiffusion):
    """The digits demo's pixel-space MLP (``MLPVelocityNet``), with Stable Diffusion's text tower and calling
    convention (CLIP hidden states as ``encoder_hidden_states``)."""

    name = "digits"
    title = "digits demo"
    pipeline_classes = ()
    network_classes = (("instaflow_pl.velocity.mlp", "MLPVelocityNet"),)
    shard_blocks = ("ResidualBlock",)
    uses_vae = False
    legacy_names = ("sd",)
    teacher_solvers = ()
    default_teacher_solver = "euler"
    fixture = "instaflow_pl.families.digits_tiny"
    standalone_pipeline = False  # the shipped file could not load the MLP without instaflow-pl
    card_steps_note = (
        "The network is instaflow-pl's pixel-space `MLPVelocityNet` (no VAE: the latents are the images), sampled by",
        "the project's Euler LatentODE: t = 0 is noise, t = 1 is data, the network is called at timestep",
        "`(1 - t) * 1000` and returns the velocity (data - noise).",
    )

    def card_stock_use(self, steps: int, info: Mapping[str, Any]) -> list[str]:
        """Stock diffusers cannot load the MLP network: instaflow-pl samples it."""
        return ["Stock diffusers cannot load this network (instaflow-pl's `MLPVelocityNet`); use instaflow-pl below."]

    def owns_network_config(self, config: Mapping[str, Any]) -> bool:
        """An ``MLPVelocityNet``."""
        return Family.owns_network_config(self, config)

    def latent_geometry(self, config: Mapping[str, Any]) -> LatentGeometry:
        """Exactly ``in_channels x sample_size x sample_size``: the MLP works on flattened pixels."""
        return LatentGeometry(int(config["in_channels"]), int(config["sample_size"]), 0)
