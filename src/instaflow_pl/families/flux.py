"""FLUX.1 ([dev] and [schnell]): a flow-matching MMDiT on 2 x 2-packed latents, already a rectified flow (a 1-RF).

Our convention maps onto Flux's as onto SD3's: sigma = 1 - t, the transformer takes ``timestep = sigma`` (diffusers'
``timestep / 1000``; it multiplies by 1000 inside) and our velocity (data - noise) is minus its output. Latents
(B, C, H, W) are packed into (B, H/2 * W/2, 4C) tokens with their patch-grid positions as ``img_ids`` and unpacked
after the call, so the rest of the project sees ordinary (C, H, W) latents with H and W even. The teacher's time grid
is ``linspace(1, 1/N, N)`` shifted as the scheduler says: by the image's packed token count when it uses dynamic
shifting ([dev]), by its fixed shift otherwise ([schnell]).

FLUX.1 [dev] is guidance-distilled (``guidance_embeds``): the guidance value is an input, one branch, not classifier-
free guidance. As a teacher its guidance scale is that input (``FluxPipeline``'s ``guidance_scale``); true CFG
(``true_cfg_scale`` with a negative prompt) is :class:`~instaflow_pl.velocity.guidance.ClassifierFreeGuidance` with
``embedded`` set. A reflowed student keeps the input at one value, the one its pairs were made with: the prompt
encoder attaches it to every condition, read from the folder's ``instaflow.json`` (``embedded_guidance``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from instaflow_pl.errors import UserError
from instaflow_pl.families.base import MAX_SEQUENCE_LENGTH, PROMPT_LENGTH_KEY, Family
from instaflow_pl.families.base import check_sequence_length as check_prompt_length
from instaflow_pl.families.geometry import LatentGeometry
from instaflow_pl.kinds import VELOCITY_KIND, normalise_kind
from instaflow_pl.solver.ode import METHODS
from instaflow_pl.text import NULL_PROMPT, PromptEncoder
from instaflow_pl.velocity.condition import TextCondition

SCHNELL_SEQUENCE_LENGTH = 256
"""T5 tokens FLUX.1 [schnell] is used with (black-forest-labs' reference sampler); more only warns."""
DEFAULT_GUIDANCE = 3.5
"""The guidance input of a [dev]-like network when nothing sets it (``FluxPipeline``'s default ``guidance_scale``,
FLUX.1 [dev]'s recommended value)."""
DEFAULT_SAMPLE_SIZE = 128
"""Native latent height and width (``FluxPipeline.default_sample_size``: 1024 px through the 8x VAE). A transformer
config may record another as ``sample_size`` (the tiny fixture's); diffusers ignores that key."""
INFO_GUIDANCE = "embedded_guidance"
"""The ``instaflow.json`` key of the guidance input a reflowed [dev] student keeps."""
INFO_TOKENS = PROMPT_LENGTH_KEY
"""The ``instaflow.json`` key of the prompt length (T5 tokens) a student was trained with."""


def check_sequence_length(tokens: int) -> int:
    """``tokens`` as an int, or a clear error when T5 cannot take that many (1 to 512, as ``FluxPipeline``)."""
    return check_prompt_length(tokens, "Flux")


class FluxPromptEncoder(PromptEncoder):
    """Flux's prompt encoding, as ``FluxPipeline.encode_prompt``: CLIP-L's pooled output (77 tokens) and T5's
    token states padded to ``max_sequence_length``; every condition also carries the network's guidance input.

    Args:
        tokenizers: CLIP-L's and T5's tokenizers.
        text_encoders: CLIP-L (``CLIPTextModel``) and T5 (``T5EncoderModel``).
        max_sequence_length: T5 tokens of a prompt (at most 512).
        guidance: The guidance input every condition carries (a [dev]-like network's; None: the network has none).
        cache_mb: Memory for cached conditions (see :class:`~instaflow_pl.text.PromptEncoder`).
    """

    def __init__(
        self,
        tokenizers,
        text_encoders,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
        guidance: float | None = None,
        cache_mb: float = 0.0,
    ):
        super().__init__(cache_mb=cache_mb)
        self.tokenizer, self.tokenizer_2 = tokenizers
        self.text_encoder, self.text_encoder_2 = text_encoders
        self.max_sequence_length = check_sequence_length(max_sequence_length)
        self.guidance = guidance
        self.freeze()

    def encode_batch(self, prompts: list[str]) -> TextCondition:
        """(B, max_sequence_length, D) T5 states and CLIP-L's (B, P) pooled output."""
        pooled = self.text_encoder(self.tokenize(self.tokenizer, prompts)).pooler_output
        states = self.text_encoder_2(self.tokenize(self.tokenizer_2, prompts, self.max_sequence_length))[0]
        return TextCondition(states, pooled=pooled.to(states.dtype))

    def encode(self, prompts) -> TextCondition:
        """The condition of ``prompts`` with the guidance input (after the cache, so the value may change)."""
        return super().encode(prompts).with_guidance(self.guidance)

    def null_condition(self) -> TextCondition:
        """The null prompt's condition with the guidance input."""
        return super().null_condition().with_guidance(self.guidance)


def pack(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents as (B, H/2 * W/2, 4C) tokens of 2 x 2 patches (``FluxPipeline._pack_latents``)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """:func:`pack`'s inverse: (B, H/2 * W/2, 4C) tokens as (B, C, H, W) latents."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def image_ids(height: int, width: int, device: torch.device) -> torch.Tensor:
    """(H/2 * W/2, 3) positions of the packed patches: 0, row, column (``_prepare_latent_image_ids``)."""
    rows = torch.arange(height // 2, device=device, dtype=torch.float32)
    cols = torch.arange(width // 2, device=device, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(rows, cols, indexing="ij"), dim=-1).reshape(-1, 2)
    return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=-1)


class Flux(Family):
    """FLUX.1 [dev] and [schnell] (``FluxTransformer2DModel``)."""

    name = "flux"
    title = "FLUX.1"
    pipeline_classes = ("FluxPipeline",)
    network_folder = "transformer"
    text_parts = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2")
    default_classes: ClassVar[dict[str, tuple[str, str]]] = {
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "tokenizer_2": ("transformers", "T5TokenizerFast"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "text_encoder_2": ("transformers", "T5EncoderModel"),
    }
    velocity_sign = -1.0
    teacher_is_flow = True
    teacher_solvers = tuple(METHODS)
    default_teacher_solver = "euler"
    lora_pipeline = "FluxPipeline"
    network_classes = (("diffusers", "FluxTransformer2DModel"),)
    shard_blocks = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
    fixture = "instaflow_pl.families.flux_tiny"
    default_max_shift = 1.15
    card_steps_note = (
        "The transformer keeps Flux's flow-matching convention: at sigma = 1 - t (t = 0 noise, t = 1 data) it is",
        "called on 2 x 2-packed latents at timestep sigma and returns noise - data, minus the velocity. The exported",
        "FlowMatchEulerDiscreteScheduler (shift 1, no dynamic shifting) on FluxPipeline's grid",
        "`linspace(1, 1/k, k)` takes the same Euler steps as instaflow-pl's LatentODE.",
    )

    def card_stock_use(self, steps: int, info: Mapping[str, Any]) -> list[str]:
        """Stock ``FluxPipeline`` samples an export (its default sigmas are the uniform grid) at the export's native
        size, with the guidance input and prompt length the model was trained with."""
        size = int(info["image_size"])
        guidance = info.get(INFO_GUIDANCE, DEFAULT_GUIDANCE)
        tokens = int(info.get(INFO_TOKENS) or MAX_SEQUENCE_LENGTH)
        if guidance is None:
            setting = [f"k = {steps}  # steps ([schnell]-like: no guidance input)"]
            call = f"num_inference_steps=k, height={size}, width={size}, max_sequence_length={tokens}"
        else:
            setting = [f"k, g = {steps}, {float(guidance)!r}  # steps; the guidance input it was trained with"]
            call = f"num_inference_steps=k, guidance_scale=g, height={size}, width={size}, max_sequence_length={tokens}"
        return [
            "With diffusers alone (no instaflow-pl needed): the stock Flux pipeline samples this folder, and samples",
            "what instaflow-pl samples, at the guidance input (`instaflow.json`: `embedded_guidance`) and prompt",
            "length (`max_sequence_length`) the model was trained with, at its native size.",
            "",
            "```python",
            "from diffusers import FluxPipeline",
            "",
            "pipe = FluxPipeline.from_pretrained(DIR)",
            *setting,
            "image = pipe(",
            f"    'a photo of a cat', {call}",
            ").images[0]",
            "```",
        ]

    def stock_sampling_args(
        self, latents: torch.Tensor, guidance_scale: float, info: Mapping[str, Any], pixels_per_latent: int
    ) -> dict[str, Any]:
        """``FluxPipeline``'s arguments: packed noise, the image size, the recorded guidance input as its
        ``guidance_scale`` and classifier-free guidance as true CFG (``true_cfg_scale`` with the null prompt)."""
        height, width = latents.shape[-2:]
        args: dict[str, Any] = {
            "latents": pack(latents),
            "height": height * pixels_per_latent,
            "width": width * pixels_per_latent,
            "true_cfg_scale": guidance_scale,
            "max_sequence_length": int(info.get(INFO_TOKENS) or MAX_SEQUENCE_LENGTH),
        }
        if guidance_scale > 1:
            args["negative_prompt"] = NULL_PROMPT
        embedded = info.get(INFO_GUIDANCE, DEFAULT_GUIDANCE)
        if embedded is not None:
            args["guidance_scale"] = float(embedded)
        return args

    def stock_latents(self, latents: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """``FluxPipeline``'s latents are packed: unpacked to (B, C, H, W)."""
        return unpack(latents, shape[1], shape[2])

    # ---- networks -------------------------------------------------------------------------------------------

    def latent_geometry(self, config: Mapping[str, Any]) -> LatentGeometry:
        """``in_channels / 4`` channels (the transformer sees 2 x 2 patches), H and W even."""
        size = int(config.get("sample_size", DEFAULT_SAMPLE_SIZE))
        return LatentGeometry(int(config["in_channels"]) // 4, size, 2)

    def image_seq_len(self, latent_shape: tuple[int, int, int]) -> int:
        """Packed tokens of the latents: what dynamic shifting counts."""
        return (latent_shape[1] // 2) * (latent_shape[2] // 2)

    def flow_sigmas(self, steps: int) -> list[float]:
        """``FluxPipeline``'s sigmas before shifting: ``linspace(1, 1/N, N)``."""
        return np.linspace(1.0, 1 / steps, steps).tolist()

    def network_inputs(
        self, network: nn.Module, x: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> dict[str, Any]:
        """T5 states, CLIP pooled output, zero text ids and the guidance input (for [dev]-like networks)."""
        if cond.pooled is None:
            raise ValueError("a Flux transformer needs pooled projections; encode prompts with the Flux encoder")
        takes_guidance = bool(network.config.guidance_embeds)
        if takes_guidance and cond.guidance is None:
            raise UserError("this Flux transformer (guidance_embeds, [dev]-like) needs a guidance value; none was set")
        if not takes_guidance and cond.guidance is not None:
            raise UserError("this Flux transformer has no guidance input ([schnell]-like); it takes no guidance value")
        tokens = cond.embeds.shape[1]
        return {
            "encoder_hidden_states": cond.embeds,
            "pooled_projections": cond.pooled,
            "guidance": cond.guidance,
            "txt_ids": torch.zeros(tokens, 3, device=x.device),
        }

    def call(
        self, network: nn.Module, x: torch.Tensor, timestep: torch.Tensor, cond: TextCondition, pixels_per_latent: int
    ) -> torch.Tensor:
        """The transformer's output (it points from data to noise) on the packed latents at sigma = timestep / 1000,
        unpacked to (B, C, H, W)."""
        height, width = x.shape[-2:]
        if height % 2 or width % 2:
            raise UserError(f"Flux latents need an even height and width, got {height} x {width}")
        timestep = torch.as_tensor(timestep, device=x.device)
        timestep = timestep.expand(x.shape[0]) if timestep.ndim == 0 else timestep
        inputs = self.network_inputs(network, x, cond, pixels_per_latent)
        out = network(
            hidden_states=pack(x),
            timestep=timestep / 1000,
            img_ids=image_ids(height, width, x.device),
            **inputs,
            return_dict=False,
        )[0]
        return unpack(out, height, width)

    def guidance_as_input(self, kind: str, network_config: Mapping[str, Any]) -> bool:
        """A released [dev]-like teacher takes its guidance scale as its input, as ``FluxPipeline`` guides it."""
        return kind != VELOCITY_KIND and bool(network_config.get("guidance_embeds"))

    # ---- prompts --------------------------------------------------------------------------------------------

    def encoder_from_parts(
        self, parts: dict[str, Any], index: dict[str, Any], network_config: dict[str, Any], cache_mb: float = 0.0
    ):
        """A :class:`FluxPromptEncoder` (guidance input :data:`DEFAULT_GUIDANCE` for a [dev]-like network)."""
        guidance = DEFAULT_GUIDANCE if network_config.get("guidance_embeds") else None
        return FluxPromptEncoder(
            (parts["tokenizer"], parts["tokenizer_2"]),
            (parts["text_encoder"], parts["text_encoder_2"]),
            guidance=guidance,
            cache_mb=cache_mb,
        )

    def configure_encoder(self, encoder, info: Mapping[str, Any]):
        """The prompt length and a student's guidance input as its ``instaflow.json`` records them."""
        if info.get(INFO_TOKENS) is not None:
            encoder.max_sequence_length = check_sequence_length(info[INFO_TOKENS])
        if encoder.guidance is not None and info.get(INFO_GUIDANCE) is not None:
            encoder.guidance = float(info[INFO_GUIDANCE])
        return encoder

    def encoder_info(self, encoder) -> dict[str, Any]:
        """The guidance input (None for [schnell]) and the prompt length, for ``instaflow.json``."""
        return {INFO_GUIDANCE: encoder.guidance, INFO_TOKENS: encoder.max_sequence_length}

    def prompt_length(self, encoder) -> int | None:
        """T5 tokens of a prompt (``max_sequence_length``)."""
        return encoder.max_sequence_length

    def set_prompt_length(self, encoder, tokens: int) -> None:
        """At most 512 tokens (an error, as ``FluxPipeline``); a [schnell]-like network (no guidance input) with more
        than 256 only warns: [schnell] is used with 256."""
        tokens = check_sequence_length(tokens)
        if encoder.guidance is None and tokens > SCHNELL_SEQUENCE_LENGTH:
            rank_zero_warn(
                f"max_sequence_length {tokens}: FLUX.1 [schnell]-like models are used with at most "
                f"{SCHNELL_SEQUENCE_LENGTH} T5 tokens; longer prompts may not help"
            )
        encoder.max_sequence_length = tokens

    def configure_encoder_for_pairs(
        self, encoder, teacher_kind: str, guidance: float, prompt_length: int | None = None
    ) -> None:
        """The pairs' prompt length; pairs of a released [dev]-like teacher were made with ``guidance`` as its input:
        the student keeps it (a velocity teacher's guidance is classifier-free guidance on top of its own input,
        which the student keeps)."""
        super().configure_encoder_for_pairs(encoder, teacher_kind, guidance, prompt_length)
        if encoder.guidance is not None and normalise_kind(teacher_kind) != VELOCITY_KIND:
            encoder.guidance = float(guidance)
