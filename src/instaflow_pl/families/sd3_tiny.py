"""The tiny SD3 folder (random weights, milliseconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from instaflow_pl.tiny import clip_towers, refuse_foreign, tiny_vae, write_tiny_tokenizer


def build_tiny(out_dir: str | Path, seed: int = 0, sample_size: int = 8, with_t5: bool = True) -> Path:
    """Write a tiny SD3-format folder with random weights: an MMDiT transformer on 16-channel latents (patch 2),
    CLIP-L (width 16) and CLIP-G (width 32) with projections, a small T5 encoder (width 64, so the CLIP states are
    zero-padded as in SD3), tokenizers (T5's is the tiny CLIP tokenizer), a VAE with a shift factor and SD3's
    flow-matching scheduler (shift 3).

    Args:
        out_dir: Folder to create (must not hold anything else).
        seed: Seed of the random weights, so two builds are identical.
        sample_size: Latent height and width (the VAE maps them to images twice as large).
        with_t5: Write ``text_encoder_3``/``tokenizer_3`` (without: the folder a user saves memory with).

    Returns:
        The folder's path.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    out = Path(out_dir)
    refuse_foreign(out)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = clip_towers(out, ("text_encoder", "text_encoder_2"), (16, 32), projection=True)
    joint = 64
    t5 = tokenizer_3 = None
    if with_t5:
        vocab_size = write_tiny_tokenizer(out / "tokenizer_3", max_length=256)
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=vocab_size,
                d_model=joint,
                d_ff=128,
                d_kv=16,
                num_layers=2,
                num_heads=4,
                feed_forward_proj="gated-gelu",
                is_encoder_decoder=False,
            )
        )
        tokenizer_3 = CLIPTokenizer.from_pretrained(out / "tokenizer_3")
    transformer = SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=joint,
        caption_projection_dim=32,
        pooled_projection_dim=16 + 32,
        pos_embed_max_size=32,
    )
    # SD3 medium's VAE latent convention and scheduler shift.
    vae = tiny_vae(
        sample_size, 16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
        text_encoder_3=t5,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
