"""InstaFlowPipeline: a diffusers pipeline that samples an exported velocity model in 1..N Euler steps.

It is a thin shell around the project's own pieces (PromptEncoder, NetworkVelocity, ClassifierFreeGuidance, LatentODE),
so its latents equal ``FlowModule.sample`` and ``load_teacher(DIR).sample`` for the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ModelMixin
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from instaflow_pl.conventions import latents_to_images
from instaflow_pl.errors import UserError
from instaflow_pl.families import family_of_network
from instaflow_pl.solver import LatentODE
from instaflow_pl.text import PromptEncoder
from instaflow_pl.velocity import ClassifierFreeGuidance, NetworkVelocity
from instaflow_pl.velocity.mlp import MLPVelocityNet  # noqa: F401 - imported so diffusers may load demo folders
from instaflow_pl.velocity.networks import latent_geometry

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
"""What ``InstaFlowPipeline.__call__`` can return."""


class InstaFlowPipeline(DiffusionPipeline):
    """Text-to-image sampling of a rectified flow (k-RF or distilled InstaFlow student) with the Euler LatentODE.

    Load an export with ``InstaFlowPipeline.from_pretrained(DIR)``. Time runs from noise (t = 0) to data (t = 1); the
    UNet is called at timestep ``(1 - t) * 1000`` and returns the velocity. The scheduler is kept only as a record
    of the timestep range: stepping is the LatentODE's.

    The same class samples every family's exports (SD 1.x/2.x, SDXL, SD3): the network's family
    (:mod:`instaflow_pl.families`) says how prompts are encoded and the network is called.

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
    ):
        super().__init__()
        if (unet is None) == (transformer is None):
            raise UserError("an InstaFlowPipeline needs exactly one velocity network: a unet or a transformer")
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            transformer=transformer,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

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

    @property
    def latent_channels(self) -> int:
        """Channels of the latents the network takes."""
        return int(self.network.config.in_channels)

    @property
    def default_size(self) -> int:
        """Image height and width by default: the UNet's sample size times the VAE's scale factor."""
        size = self.network.config.sample_size
        return int(size if isinstance(size, int) else size[0]) * self.vae_scale_factor

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """The (C, H, W) latent shape of images of ``height`` x ``width`` (defaults: :attr:`default_size`)."""
        height = self.default_size if height is None else int(height)
        width = self.default_size if width is None else int(width)
        geometry = latent_geometry(self.network)
        scale = self.vae_scale_factor
        shape = (self.latent_channels, height // scale, width // scale)
        if height <= 0 or width <= 0 or height % scale or width % scale or not geometry.fits(shape):
            size = (
                f"{geometry.size * scale}"
                if geometry.down_factor == 0
                else f"multiples of {geometry.down_factor * scale}"
            )
            raise UserError(f"height and width must be {size}, got {height} x {width}")
        return shape

    def sample_latents(
        self, x0: torch.Tensor, prompts: Sequence[str], num_inference_steps: int = 1, guidance_scale: float = 0.0
    ) -> torch.Tensor:
        """Solve the flow from noise ``x0`` for ``prompts``: Euler LatentODE with classifier-free guidance.

        ``guidance_scale <= 1`` evaluates the conditional branch only (no guidance), as in diffusers.
        """
        velocity = NetworkVelocity(self.network, pixels_per_latent=self.vae_scale_factor)
        field = ClassifierFreeGuidance(velocity, guidance_scale)
        cond = self.prompt_encoder().condition(list(prompts), with_null=field.active)
        return LatentODE("euler", num_inference_steps).solve(field, x0, cond).x

    def prompt_encoder(self) -> PromptEncoder:
        """The family's prompt encoder over this pipeline's tokenizers and text encoders."""
        family = family_of_network(self.network)
        names = family.text_parts + family.optional_text_parts
        parts = {name: getattr(self, name, None) for name in names}
        return family.encoder_from_parts(parts, dict(self.config), dict(self.network.config))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents to images in [-1, 1] with the VAE (the project's latent convention).

        A pixel-space model (no VAE) returns its latents: they are the images.
        """
        return latents_to_images(self.vae, latents) if self.vae is not None else latents

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        num_inference_steps: int = 1,
        guidance_scale: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate images for ``prompt``.

        Args:
            prompt: One prompt or a list of prompts.
            num_inference_steps: Euler steps from noise to data (1 for a distilled InstaFlow student).
            guidance_scale: Classifier-free guidance ``w`` (>= 0); 1 or less means none (conditional branch only).
            height: Image height in pixels (default: the UNet's sample size times the VAE's scale factor).
            width: Image width in pixels (same default).
            num_images_per_prompt: Images per prompt.
            latents: The noise X0, shape (B, C, H, W) with B = prompts x images per prompt; drawn from
                ``generator`` when absent. (The project's seed rule: ``instaflow_pl.conventions.noise_for_indices``.)
            generator: Generator(s) of the noise when ``latents`` is absent.
            output_type: ``pil``, ``np`` or ``pt`` (images in [0, 1]), or ``latent`` (the scaled latents X1).
            return_dict: Return an ``ImagePipelineOutput`` (else a one-tuple).

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise UserError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        shape = (len(prompts), *self.latent_shape(height, width))
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise UserError(f"latents have shape {list(latents.shape)}, expected {list(shape)}")
        x1 = self.sample_latents(latents.to(device), prompts, num_inference_steps, guidance_scale)
        if output_type == "latent":
            images = x1
        else:
            images = self.image_processor.postprocess(self.decode(x1), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
