"""The self-contained InstaFlowPipeline: samples an export with stock diffusers and torch alone (no instaflow-pl).

``instaflow-pl export`` copies this file as ``instaflow_pipeline.py`` into the exports of the families whose stock
diffusers pipeline cannot sample them (SD 1.x/2.x and SDXL: a reflowed UNet's velocity has the opposite sign of
diffusers' flow-matching schedulers). SD exports name it in ``model_index.json``
(``"_class_name": ["instaflow_pipeline", "InstaFlowPipeline"]``, diffusers' custom-pipeline mechanism), so stock
diffusers loads the folder (local or on a hub) with::

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(DIR, trust_remote_code=True)
    image = pipe("a photo of a cat", num_inference_steps=1).images[0]

SDXL exports keep ``StableDiffusionXLPipeline``-loadable parts and name the file at load time instead:
``DiffusionPipeline.from_pretrained(DIR, custom_pipeline="instaflow_pipeline", trust_remote_code=True)``. SD3
exports do not ship it: stock ``StableDiffusion3Pipeline`` samples them.

The sampler is the project's, written out: Euler steps of the velocity from t = 0 (noise) to t = 1 (data) on a uniform
grid (a piecewise rectified flow's, ``windows`` > 1 in ``model_index.json``: uniform inside each of its equal time
windows, ``n // windows`` steps per window and the remainder in the first ones), the UNet called at timestep
``(1 - t) * 1000`` with its output taken as the velocity, and classifier-free guidance
``v_uncond + w (v_cond - v_uncond)`` in one batched call when ``w > 1`` (the empty prompt is the null prompt). Prompts
are encoded as the family's diffusers pipeline does: SD's CLIP last hidden state, or, for SDXL (a folder with
``text_encoder_2``), both CLIP towers' penultimate states joined, CLIP-G's pooled embedding and the default size ids
(zeros for the null prompt when ``force_zeros_for_empty_prompt``). A folder without a VAE is a pixel-space model (the
digits demo's): its latents are the images.

``instaflow_pl.pipeline.InstaFlowPipeline`` is a subclass: it keeps this sampling loop, latent shape, noise and
decoding, and replaces the two seams, :meth:`InstaFlowPipeline.condition` and :meth:`InstaFlowPipeline.velocity`,
with the project's families (so it also samples SD3). Keep this file free of ``instaflow_pl`` imports.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

logger = logging.get_logger(__name__)

UNET_TIME_SCALE = 1000.0
"""UNet timestep at flow time t = 0 (pure noise)."""

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
"""What ``InstaFlowPipeline.__call__`` can return."""


def euler_grid(steps: int, windows: int = 1) -> list[float]:
    """Flow times of ``steps`` Euler steps over ``windows`` equal windows of [0, 1]: ``steps // windows`` per window,
    one more in the first ``steps % windows``, uniform inside each (one window: ``k / steps``)."""
    grid = [0.0]
    base, extra = divmod(steps, windows)
    for k in range(windows):
        n = base + (1 if k < extra else 0)
        start, end = k / windows, (k + 1) / windows
        grid += [start + (end - start) * j / n for j in range(1, n)] + [end]
    return grid


class InstaFlowPipeline(DiffusionPipeline):
    """One-step (or few-step) text-to-image sampling of an InstaFlow / k-rectified-flow export.

    The sampling loop (:meth:`sample_latents`) asks two seams, which subclasses may replace together:
    :meth:`condition` turns prompts into the conditioning :meth:`velocity` takes.

    Args:
        vae: Decodes the scaled latents to images; None for a pixel-space model (latent = image).
        text_encoder: CLIP text model (SD: its last hidden state conditions the UNet; SDXL: CLIP-L).
        tokenizer: CLIP tokenizer (prompts padded or truncated to its ``model_max_length``).
        unet: The velocity UNet.
        scheduler: Kept as a record of the timestep range only; the Euler steps below are the sampler.
        text_encoder_2: SDXL's CLIP-G (with projection); None for SD.
        tokenizer_2: Its tokenizer.
        force_zeros_for_empty_prompt: SDXL: the null prompt's condition is zeros (copied from the base folder).
        windows: Time windows of a piecewise rectified flow (1: an InstaFlow / k-RF model); it samples with at least
            one step per window.
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"

    _optional_components = ["vae", "text_encoder_2", "tokenizer_2"]

    argument_error: type[Exception] = ValueError
    """The exception a bad argument (size, steps, guidance, output type) raises."""

    def __init__(
        self,
        vae,
        text_encoder,
        tokenizer,
        unet,
        scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
        force_zeros_for_empty_prompt: bool = True,
        windows: int = 1,
    ):
        super().__init__()
        self.register_modules(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        self.register_to_config(force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, windows=int(windows))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def network(self):
        """The velocity network (the UNet)."""
        return self.unet

    @property
    def default_size(self) -> int:
        """Image height and width by default: the network's native latent size times the VAE's scale factor."""
        return self.native_latent_size() * self.vae_scale_factor

    def native_latent_size(self) -> int:
        """The network's native latent height and width: its ``sample_size``."""
        size = self.network.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    def latent_channels(self) -> int:
        """Latent channels: the network's ``in_channels``."""
        return int(self.network.config.in_channels)

    def latent_multiple(self) -> int:
        """Latent height and width must be multiples of this: the UNet's downsampling (0: a fixed-size network,
        e.g. the digits demo's MLP, takes its sample size only)."""
        blocks = getattr(self.network.config, "down_block_types", None)
        return 2 ** (len(blocks) - 1) if blocks else 0

    def latent_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """The (C, H, W) latent shape of ``height`` x ``width`` images (defaults: :attr:`default_size`)."""
        height = self.default_size if height is None else int(height)
        width = self.default_size if width is None else int(width)
        scale = self.vae_scale_factor
        multiple = self.latent_multiple() * scale
        if multiple:
            fits = height > 0 and width > 0 and not (height % multiple or width % multiple)
        else:
            fits = height == width == self.default_size
        if not fits:
            wanted = f"multiples of {multiple}" if multiple else f"{self.default_size}"
            raise self.argument_error(f"height and width must be {wanted}, got {height} x {width}")
        return (self.latent_channels(), height // scale, width // scale)

    @staticmethod
    def tokens(tokenizer, encoder, prompts: list[str]) -> torch.Tensor:
        """Token ids padded or truncated to the tokenizer's ``model_max_length``, on ``encoder``'s device."""
        max_length = int(tokenizer.model_max_length)
        tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
        if bool(tokens.attention_mask[:, -1].any()):
            lengths = [len(ids) for ids in tokenizer(prompts, truncation=False)["input_ids"]]
            if max(lengths) > max_length:
                logger.warning(f"prompts longer than {max_length} tokens were truncated")
        return tokens.input_ids.to(next(encoder.parameters()).device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (B, max_length, D) and the pooled embedding (B, P) or None.

        SD: the text encoder's last hidden state, no pooled embedding. SDXL: the penultimate hidden states of both
        towers joined along the width, and CLIP-G's projected embedding.
        """
        if self.text_encoder_2 is None:
            return self.text_encoder(self.tokens(self.tokenizer, self.text_encoder, prompts))[0], None
        states, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = encoder(self.tokens(tokenizer, encoder, prompts), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = out[0]
        return torch.cat(states, dim=-1), pooled

    def null_condition(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The null prompt's embeddings (batch 1): the encoded "", or zeros for SDXL's force_zeros_for_empty_prompt."""
        embeds, pooled = self.encode([""])
        if self.text_encoder_2 is not None and self.config.force_zeros_for_empty_prompt:
            return torch.zeros_like(embeds), torch.zeros_like(pooled)
        return embeds, pooled

    def condition(self, prompts: list[str], guided: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What :meth:`velocity` is conditioned on: the prompts' embeddings and pooled embedding (or None); with
        ``guided``, the null prompt's for the whole batch first, then the prompts', in one batch of twice the size."""
        embeds, pooled = self.encode(prompts)
        if guided:
            null, null_pooled = self.null_condition()
            embeds = torch.cat([null.expand_as(embeds), embeds])
            pooled = None if pooled is None else torch.cat([null_pooled.expand_as(pooled), pooled])
        return embeds, pooled

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, cond: tuple[torch.Tensor, torch.Tensor | None]
    ) -> torch.Tensor:
        """The UNet's velocity at flow time ``t`` (B,): timestep ``(1 - t) * 1000``, output in float32.

        ``cond`` is :meth:`condition`'s (embeds, pooled). With a pooled embedding (SDXL) the UNet also gets it and the
        size ids (height, width, 0, 0, height, width) of the images the latents ``x`` decode to.
        """
        embeds, pooled = cond
        dtype = next(self.unet.parameters()).dtype
        timestep = (1.0 - t) * UNET_TIME_SCALE
        x = x.to(dtype)
        extra = {}
        if pooled is not None:
            height, width = (int(s) * self.vae_scale_factor for s in x.shape[-2:])
            ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=x.dtype, device=x.device)
            extra["added_cond_kwargs"] = {"text_embeds": pooled.to(dtype), "time_ids": ids.expand(x.shape[0], 6)}
        out = self.unet(x, timestep, encoder_hidden_states=embeds.to(dtype), **extra, return_dict=False)[0]
        return out.float()

    @torch.no_grad()
    def sample_latents(
        self, x0: torch.Tensor, prompts: list[str], num_inference_steps: int = 1, guidance_scale: float = 0.0
    ) -> torch.Tensor:
        """Euler steps from noise ``x0`` (t = 0) to data (t = 1), guided when ``guidance_scale > 1``."""
        if num_inference_steps < 1:
            raise self.argument_error(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if guidance_scale < 0:
            raise self.argument_error(f"guidance_scale must be >= 0 (1 or less means none), got {guidance_scale}")
        windows = int(self.config.get("windows", 1) or 1)
        if num_inference_steps < windows:
            raise self.argument_error(
                f"num_inference_steps={num_inference_steps} cannot cross the model's {windows} time windows: take at "
                f"least {windows} steps (one per window)"
            )
        guided = guidance_scale > 1.0
        cond = self.condition(list(prompts), guided)
        grid = euler_grid(num_inference_steps, windows)
        x = x0
        for t, t_next in zip(grid, grid[1:], strict=False):
            t_batch = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
            if guided:  # unconditional first, then conditional, in one batch
                uncond, conditional = self.velocity(torch.cat([x, x]), torch.cat([t_batch, t_batch]), cond).chunk(2)
                v = uncond + float(guidance_scale) * (conditional - uncond)
            else:
                v = self.velocity(x, t_batch, cond)
            x = x + (t_next - t) * v.to(x.dtype)
        return x

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents to images in about [-1, 1] (``latents / scaling_factor + shift_factor`` through the VAE)."""
        if self.vae is None:
            return latents
        config = self.vae.config
        shift = getattr(config, "shift_factor", None) or 0.0
        unscaled = latents / getattr(config, "scaling_factor", 1.0) + shift
        return self.vae.decode(unscaled.to(self.vae.dtype), return_dict=False)[0]

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
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
            height: Image height in pixels (default: :attr:`default_size`).
            width: Image width in pixels (same default).
            num_images_per_prompt: Images per prompt.
            latents: The noise X0, shape (B, C, H, W) with B = prompts x images per prompt; drawn from
                ``generator`` when absent.
            generator: Generator(s) of the noise when ``latents`` is absent.
            output_type: ``pil``, ``np`` or ``pt`` (images in [0, 1]), or ``latent`` (the scaled latents X1).
            return_dict: Return an ``ImagePipelineOutput`` (else a one-tuple).

        Returns:
            ``ImagePipelineOutput(images=...)`` or ``(images,)``.
        """
        if output_type not in OUTPUT_TYPES:
            raise self.argument_error(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if num_images_per_prompt < 1:
            raise self.argument_error(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        shape = (len(prompts), *self.latent_shape(height, width))
        device = self._execution_device
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise self.argument_error(f"latents have shape {list(latents.shape)}, expected {list(shape)}")
        x1 = self.sample_latents(latents.to(device), prompts, num_inference_steps, guidance_scale)
        if output_type == "latent":
            images = x1
        else:
            images = self.image_processor.postprocess(self.decode(x1), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
