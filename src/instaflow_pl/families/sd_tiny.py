"""The tiny Stable Diffusion 1.x folder (random weights, milliseconds on a CPU), and SD 1.5's architecture with random
weights (memory and speed checks at real shapes)."""

from __future__ import annotations

from pathlib import Path

import torch

from instaflow_pl.tiny import refuse_foreign, tiny_text_config, tiny_unet_config, tiny_vae, write_tiny_tokenizer


def build_tiny(out_dir: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny Stable-Diffusion-format folder with random weights to ``out_dir``.

    Latents are 4 x ``sample_size`` x ``sample_size``; the VAE maps them to RGB images twice as large.

    Args:
        out_dir: Folder to create (must not hold anything else).
        seed: Seed of the random weights, so two builds are identical.
        sample_size: Latent height and width.

    Returns:
        The folder's path.
    """
    from diffusers import UNet2DConditionModel

    out, vocab_size = _begin(out_dir, seed)
    unet = UNet2DConditionModel(
        **tiny_unet_config(sample_size),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
    )
    return save_sd_folder(out, unet, tiny_vae(sample_size), tiny_text_config(vocab_size))


def _begin(out_dir: str | Path, seed: int) -> tuple[Path, int]:
    """The folder (refusing one that holds anything else), its tiny tokenizer's vocabulary size; weights seeded."""
    out = Path(out_dir)
    refuse_foreign(out)
    vocab_size = write_tiny_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    return out, vocab_size


def save_sd_folder(out: Path, unet, vae, text_config: dict[str, int]) -> Path:
    """Save a Stable-Diffusion-format folder: the given UNet and VAE, a CLIP text tower of ``text_config`` (random,
    seeded by the caller), the tiny tokenizer already in ``out/tokenizer`` and SD 1.5's scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    # Stable Diffusion 1.5's scheduler settings.
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out


SD15_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
"""The CLIP ViT-L/14 text tower of Stable Diffusion 1.5 (its vocabulary is 49,408 tokens)."""


def build_sd15_random(out_dir: str | Path, seed: int = 0) -> Path:
    """Write a folder with Stable Diffusion 1.5's architecture and random weights (for memory and speed checks).

    The UNet (860M parameters, latents 4 x 64 x 64), VAE (512 px) and CLIP ViT-L text tower have SD 1.5's shapes;
    the tokenizer is the tiny one (its token ids fit the real vocabulary size). About 4.3 GB in fp32.

    Args:
        out_dir: Folder to create (must not hold anything else).
        seed: Seed of the random weights.

    Returns:
        The folder's path.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out, vocab_size = _begin(out_dir, seed)
    # diffusers' defaults are SD 1.x's UNet, less its text width and latent size.
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
        scaling_factor=0.18215,
    )
    text = {**tiny_text_config(vocab_size), **SD15_TEXT, "vocab_size": 49408, "projection_dim": 768}
    return save_sd_folder(out, unet, vae, text)
