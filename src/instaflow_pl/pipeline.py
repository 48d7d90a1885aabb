"""InstaFlowPipeline: samples an export of any family (SD 1.x/2.x, SDXL, SD3, the digits demo) in 1..N Euler steps.

It is the self-contained pipeline (:mod:`instaflow_pl.standalone_pipeline`, shipped in exports) with the project's
families in its two seams: prompts are encoded by the family's PromptEncoder and the network is called through the
project's velocity wrapper (the family's calling convention and velocity sign). The sampling loop, latent shape, noise
and decoding are the standalone pipeline's, so its latents equal the shipped file's and, Euler step for Euler step,
``LatentODE("euler")`` with ``ClassifierFreeGuidance`` (``FlowModule.sample``, ``load_teacher(DIR).sample``).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ModelMixin

from instaflow_pl import standalone_pipeline
from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES, family_of_network, latent_geometry
from instaflow_pl.model_folder import read_info
from instaflow_pl.text import PromptEncoder
from instaflow_pl.velocity import NetworkVelocity
from instaflow_pl.velocity.condition import TextCondition


class InstaFlowPipeline(standalone_pipeline.InstaFlowPipeline):
    """Text-to-image sampling of a rectified flow (k-RF or distilled InstaFlow student) with Euler steps.

    Load an export with ``InstaFlowPipeline.from_pretrained(DIR)``. Time runs from noise (t = 0) to data (t = 1); the
    network is called at timestep ``(1 - t) * 1000``. The scheduler is kept only as a record of the timestep range.
    The same class samples every family's exports: the network's family (:mod:`instaflow_pl.families`) says how
    prompts are encoded and the network is called. Noise drawn with the project's seed rule is
    ``instaflow_pl.conventions.noise_for_indices``; bad arguments raise :class:`~instaflow_pl.errors.UserError`.

    Args:
        vae: Decodes the scaled latents to images; None for a pixel-space model (the digits demo: latent = image).
        text_encoder: CLIP text model (frozen).
        tokenizer: CLIP tokenizer.
        unet: The velocity UNet (or another network with its calling convention, e.g. the demo's MLP); None for
            a transformer family (SD3).
        scheduler: Any diffusers scheduler (not used for stepping).
        text_encoder_2: The second text encoder (SDXL, SD3: CLIP-G).
        tokenizer_2: Its tokenizer.
        text_encoder_3: The third text encoder (SD3: T5; None means zeros, as in diffusers).
        tokenizer_3: Its tokenizer.
        transformer: The velocity transformer of SD3 exports (instead of ``unet``).
        force_zeros_for_empty_prompt: SDXL: the null prompt's condition is zeros (copied from the base folder).
        windows: Time windows of a piecewise rectified flow (an export's ``instaflow.json`` ``windows``; 1: none).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"

    _optional_components = [
        "vae",
        "unet",
        "transformer",
        "text_encoder_2",
        "tokenizer_2",
        "text_encoder_3",
        "tokenizer_3",
    ]

    argument_error = UserError

    def __init__(
        self,
        vae: AutoencoderKL | None,
        text_encoder,
        tokenizer,
        unet: ModelMixin | None,
        scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
        transformer: ModelMixin | None = None,
        force_zeros_for_empty_prompt: bool = True,
        windows: int = 1,
    ):
        if (unet is None) == (transformer is None):
            raise UserError("an InstaFlowPipeline needs exactly one velocity network: a unet or a transformer")
        super().__init__(
            vae,
            text_encoder,
            tokenizer,
            unet,
            scheduler,
            text_encoder_2,
            tokenizer_2,
            force_zeros_for_empty_prompt,
            windows,
        )
        self.register_modules(text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3, transformer=transformer)
        self.instaflow_info: dict = {}
        """The loaded folder's ``instaflow.json`` (empty for a released folder or one built in memory)."""

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """diffusers' ``from_pretrained``, with every registered family's network classes importable (a folder's
        ``model_index.json`` may name a network class outside diffusers, e.g. the digits family's MLP)."""
        for family in FAMILIES.values():
            for module, _ in family.network_classes:
                importlib.import_module(module)
        pipe = super().from_pretrained(*args, **kwargs)
        source = Path(str(args[0] if args else kwargs.get("pretrained_model_name_or_path", "")))
        if source.is_dir():
            pipe.instaflow_info = read_info(source)
            pipe.register_to_config(windows=int(pipe.instaflow_info.get("windows", 1)))  # a piecewise flow's K
        return pipe

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``, reading an export's custom-pipeline entry (``"_class_name": [file, class]``,
        which stock diffusers follows to the folder's ``instaflow_pipeline.py``) as this class."""
        loaded = super().load_config(*args, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded
        if isinstance(config.get("_class_name"), list | tuple):
            config["_class_name"] = cls.__name__
        return loaded

    @property
    def network(self) -> ModelMixin:
        """The velocity network: the UNet, or SD3's transformer."""
        return self.unet if self.unet is not None else self.transformer

    def native_latent_size(self) -> int:
        """The network's native latent height and width, as its family's geometry says."""
        return latent_geometry(self.network).size

    def latent_channels(self) -> int:
        """Latent channels, as the network's family's geometry says (a Flux transformer's ``in_channels`` counts
        2 x 2 packed patches)."""
        return latent_geometry(self.network).channels

    def latent_multiple(self) -> int:
        """Latent height and width must be multiples of this (0: only the native size): the network's geometry."""
        return latent_geometry(self.network).down_factor

    def prompt_encoder(self) -> PromptEncoder:
        """The family's prompt encoder over this pipeline's tokenizers and text encoders."""
        family = family_of_network(self.network)
        names = family.text_parts + family.optional_text_parts
        parts = {name: getattr(self, name, None) for name in names}
        encoder = family.encoder_from_parts(parts, dict(self.config), dict(self.network.config))
        return family.configure_encoder(encoder, self.instaflow_info)

    def condition(self, prompts: list[str], guided: bool) -> TextCondition:
        """The family's conditioning of ``prompts``; with ``guided``, the null condition's batch first, then theirs."""
        cond = self.prompt_encoder().condition(prompts, with_null=guided)
        return cond.unconditional().concat(cond) if guided else cond

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: TextCondition) -> torch.Tensor:
        """The velocity at flow time ``t`` (B,), in float32: the network called as its family says."""
        family = family_of_network(self.network)
        return NetworkVelocity(self.network, family, pixels_per_latent=self.vae_scale_factor)(x, t, cond)
