"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained by flow matching, i.e. already a rectified flow (a 1-RF).

Our convention maps exactly onto SD3's: sigma = 1 - t, the network's timestep is sigma * 1000 (the same number as a
UNet's (1 - t) * 1000), and our velocity (data - noise) is minus the network's output. The scheduler's shifted
sigma schedule becomes a LatentODE ``time_grid``, so the SD3 teacher is solved by the same LatentODE as every k-RF.
Reflowed SD3 transformers keep SD3's output convention, so an export is still an SD3 folder for stock diffusers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.families.base import PROMPT_LENGTH_KEY, Family, check_sequence_length
from instaflow_pl.families.geometry import LatentGeometry
from instaflow_pl.solver.ode import METHODS
from instaflow_pl.text import PromptEncoder, clip_states
from instaflow_pl.velocity.condition import TextCondition

T5_TOKENS = 256
"""Tokens of the T5 prompt by default (diffusers' ``max_sequence_length`` default for SD3; at most 512)."""
INFO_TOKENS = PROMPT_LENGTH_KEY
"""The ``instaflow.json`` key of the prompt length (T5 tokens) a model was trained with."""


class SD3PromptEncoder(PromptEncoder):
    """SD3's prompt encoding, as ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L and CLIP-G penultimate states
    joined along the width and zero-padded to the joint width, followed by T5's tokens; the pooled embedding is both
    CLIPs' projections joined. Without T5 (``text_encoder_3`` left out to save memory) its tokens are zeros, as in
    diffusers.

    Args:
        tokenizers: CLIP-L's, CLIP-G's and T5's tokenizers (T5's may be None).
        text_encoders: CLIP-L and CLIP-G (``CLIPTextModelWithProjection``) and T5 (``T5EncoderModel`` or None).
        joint_dim: Width of the joint token sequence (the transformer's ``joint_attention_dim``).
        max_sequence_length: Tokens of the T5 part (at most 512).
        cache_mb: Memory for cached conditions (see :class:`~instaflow_pl.text.PromptEncoder`).
    """

    def __init__(
        self, tokenizers, text_encoders, joint_dim: int, max_sequence_length: int = T5_TOKENS, cache_mb: float = 0.0
    ):
        super().__init__(cache_mb=cache_mb)
        self.tokenizer, self.tokenizer_2, self.tokenizer_3 = tokenizers
        self.text_encoder, self.text_encoder_2, self.text_encoder_3 = text_encoders
        self.joint_dim = int(joint_dim)
        self.max_sequence_length = check_sequence_length(max_sequence_length, "SD3")
        self.freeze()

    def encode_batch(self, prompts: list[str]) -> TextCondition:
        """(B, 77 + max_sequence_length, joint_dim) token states and the (B, P_L + P_G) pooled embedding."""
        states_l, pooled_l = clip_states(self, self.tokenizer, self.text_encoder, prompts, layer=-2)
        states_g, pooled_g = clip_states(self, self.tokenizer_2, self.text_encoder_2, prompts, layer=-2)
        clip = torch.cat([states_l, states_g], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        if self.text_encoder_3 is None:
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, self.joint_dim)
        else:
            tokens = self.tokenize(self.tokenizer_3, prompts, self.max_sequence_length)
            t5 = self.text_encoder_3(tokens)[0].to(clip.dtype)
        return TextCondition(torch.cat([clip, t5], dim=-2), pooled=torch.cat([pooled_l, pooled_g], dim=-1))


def _length_argument(info: Mapping[str, Any]) -> str:
    """The card's ``max_sequence_length`` argument when the export reads prompts at another length than the stock
    pipeline's default (256)."""
    tokens = info.get(INFO_TOKENS)
    return "" if tokens is None or int(tokens) == T5_TOKENS else f", max_sequence_length={int(tokens)}"


class StableDiffusion3(Family):
    """Stable Diffusion 3 and 3.5 (``SD3Transformer2DModel``)."""

    name = "sd3"
    title = "Stable Diffusion 3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    network_folder = "transformer"
    text_parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    optional_text_parts = ("tokenizer_3", "text_encoder_3")
    default_classes: ClassVar[dict[str, tuple[str, str]]] = {
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "CLIPTokenizer"),
        "tokenizer_3": ("transformers", "T5TokenizerFast"),
        "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
        "text_encoder_3": ("transformers", "T5EncoderModel"),
    }
    velocity_sign = -1.0
    teacher_is_flow = True
    teacher_solvers = tuple(METHODS)
    default_teacher_solver = "euler"
    lora_pipeline = "StableDiffusion3Pipeline"
    network_classes = (("diffusers", "SD3Transformer2DModel"),)
    shard_blocks = ("JointTransformerBlock", "SD3SingleTransformerBlock")
    fixture = "instaflow_pl.families.sd3_tiny"
    card_steps_note = (
        "The transformer keeps SD3's flow-matching convention: at sigma = 1 - t (t = 0 noise, t = 1 data) it is",
        "called at timestep sigma * 1000 and returns noise - data, minus the velocity. So the exported",
        "FlowMatchEulerDiscreteScheduler (shift 1) takes the same Euler steps as instaflow-pl's LatentODE on the grid",
        "`sigmas = [1 - i / k for i in range(k)]`. Without `sigmas=` the stock grid is `linspace(1, 1/1000, k)`: the",
        "same sample at k = 1, a slightly different one for k > 1.",
    )

    def card_stock_use(self, steps: int, info: Mapping[str, Any]) -> list[str]:
        """Stock ``StableDiffusion3Pipeline`` samples an export: the uniform grid through ``sigmas=``."""
        return [
            "With diffusers alone (no instaflow-pl needed): the stock SD3 pipeline samples this folder; with the",
            "uniform `sigmas` below it samples what instaflow-pl samples.",
            "",
            "```python",
            "from diffusers import StableDiffusion3Pipeline",
            "",
            "pipe = StableDiffusion3Pipeline.from_pretrained(DIR)",
            f"k = {steps}  # steps",
            "sigmas = [1 - i / k for i in range(k)]",
            "image = pipe('a photo of a cat', num_inference_steps=k, sigmas=sigmas, guidance_scale=0.0"
            f"{_length_argument(info)}).images[0]",
            "```",
        ]

    def stock_sampling_args(
        self, latents: torch.Tensor, guidance_scale: float, info: Mapping[str, Any], pixels_per_latent: int
    ) -> dict[str, Any]:
        """The noise, the guidance and the recorded prompt length."""
        args = super().stock_sampling_args(latents, guidance_scale, info, pixels_per_latent)
        return args | {"max_sequence_length": int(info.get(INFO_TOKENS) or T5_TOKENS)}

    def latent_geometry(self, config: Mapping[str, Any]) -> LatentGeometry:
        """``in_channels`` channels, sizes multiples of the patch size."""
        return LatentGeometry(int(config["in_channels"]), int(config["sample_size"]), int(config["patch_size"]))

    def network_inputs(
        self, network: nn.Module, x: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> dict[str, Any]:
        """The joint token states and the pooled projections."""
        if cond.pooled is None:
            raise ValueError("an SD3 transformer needs pooled projections; encode prompts with the SD3 encoder")
        return {"encoder_hidden_states": cond.embeds, "pooled_projections": cond.pooled}

    def call(
        self, network: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> torch.Tensor:
        """The transformer's output (it points from data to noise) at timestep sigma * 1000, one per sample."""
        timestep = torch.as_tensor(timestep, device=x.device)
        timestep = timestep.expand(x.shape[0]) if timestep.ndim == 0 else timestep
        inputs = self.network_inputs(network, x, cond, pixels_per_latent)
        return network(hidden_states=x, timestep=timestep, **inputs, return_dict=False)[0]

    def encoder_from_parts(
        self, parts: dict[str, Any], index: dict[str, Any], network_config: dict[str, Any], cache_mb: float = 0.0
    ):
        """An :class:`SD3PromptEncoder` (zero T5 tokens when the folder has no ``text_encoder_3``)."""
        tokenizers = (parts["tokenizer"], parts["tokenizer_2"], parts.get("tokenizer_3"))
        encoders = (parts["text_encoder"], parts["text_encoder_2"], parts.get("text_encoder_3"))
        if (tokenizers[2] is None) != (encoders[2] is None):
            have, lack = (
                ("text_encoder_3", "tokenizer_3") if tokenizers[2] is None else ("tokenizer_3", "text_encoder_3")
            )
            raise UserError(f"the SD3 folder has {have}/ but no {lack}/: T5 needs both (or neither, for zeros)")
        return SD3PromptEncoder(
            tokenizers, encoders, joint_dim=network_config["joint_attention_dim"], cache_mb=cache_mb
        )

    recorded_prompt_length = T5_TOKENS

    def prompt_length(self, encoder) -> int | None:
        """T5 tokens of a prompt (``max_sequence_length``)."""
        return encoder.max_sequence_length

    def set_prompt_length(self, encoder, tokens: int) -> None:
        """At most 512 tokens (an error, as ``StableDiffusion3Pipeline``)."""
        encoder.max_sequence_length = check_sequence_length(tokens, "SD3")

    def configure_encoder(self, encoder, info: Mapping[str, Any]):
        """The prompt length a trained model's ``instaflow.json`` records."""
        if info.get(INFO_TOKENS) is not None:
            self.set_prompt_length(encoder, info[INFO_TOKENS])
        return encoder

    def encoder_info(self, encoder) -> dict[str, Any]:
        """The prompt length, for ``instaflow.json``."""
        return {INFO_TOKENS: encoder.max_sequence_length}
