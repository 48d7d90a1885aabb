"""The tiny SDXL folder (random weights, milliseconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from instaflow_pl.tiny import clip_towers, refuse_foreign, tiny_unet_config, tiny_vae


def build_tiny(out_dir: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny SDXL-format folder with random weights: a UNet with SDXL's added text-and-time embedding, CLIP-L
    (width 16) and CLIP-G with projection (width 32), their tokenizers, a VAE and SDXL's Euler scheduler.

    Args:
        out_dir: Folder to create (must not hold anything else).
        seed: Seed of the random weights, so two builds are identical.
        sample_size: Latent height and width (the VAE maps them to images twice as large).

    Returns:
        The folder's path.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    out = Path(out_dir)
    refuse_foreign(out)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = clip_towers(out, ("text_encoder", "text_encoder_2"), (16, 32), projection=False)
    time_width = 8
    unet = UNet2DConditionModel(
        **tiny_unet_config(sample_size),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_width,
        projection_class_embeddings_input_dim=6 * time_width + 32,
    )
    # SDXL base's scheduler settings.
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(sample_size),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
