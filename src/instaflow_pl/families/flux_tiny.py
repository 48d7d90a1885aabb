"""The tiny FLUX.1 folders, [dev]-like and [schnell]-like (random weights, milliseconds on a CPU)."""

from __future__ import annotations

from pathlib import Path

import torch

from instaflow_pl.tiny import clip_towers, refuse_foreign, tiny_vae, write_tiny_tokenizer


def build_tiny(out_dir: str | Path, seed: int = 0, sample_size: int = 8, guidance_embeds: bool = True) -> Path:
    """Write a tiny FLUX.1-format folder with random weights: a Flux transformer (diffusers' own test config: one
    double and one single block, 2 heads of 16, RoPE axes 4/4/8) on 16-channel latents packed in 2 x 2 patches,
    CLIP-L (width 32, its pooled output), a small T5 encoder (width 32), tokenizers (T5's is the tiny CLIP tokenizer),
    a VAE with FLUX.1's scaling and shift factors and FLUX.1's flow-matching scheduler.

    Args:
        out_dir: Folder to create (must not hold anything else).
        seed: Seed of the random weights, so two builds are identical.
        sample_size: Native latent height and width (even; the VAE maps them to images twice as large), recorded
            in the transformer's config as ``sample_size`` (diffusers ignores it, with a warning on load).
        guidance_embeds: [dev]-like, with a guidance input and dynamic shifting (FLUX.1 [dev]'s scheduler, the
            token counts scaled to tiny images); False: [schnell]-like, no guidance input, shift 1, no dynamic
            shifting (FLUX.1 [schnell]'s scheduler).

    Returns:
        The folder's path.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTokenizer, T5Config, T5EncoderModel

    out = Path(out_dir)
    refuse_foreign(out)
    torch.manual_seed(seed)
    (text_encoder,) = clip_towers(out, ("text_encoder",), (32,), projection=False)
    joint = 32
    vocab_size = write_tiny_tokenizer(out / "tokenizer_2", max_length=512)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=joint,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
        )
    )
    channels = 16
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * channels,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=[4, 4, 8],
    )
    transformer.register_to_config(sample_size=sample_size)
    # FLUX.1's VAE latent convention (its vae/config.json).
    vae = tiny_vae(
        sample_size,
        channels,
        scaling_factor=0.3611,
        shift_factor=0.1159,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    if guidance_embeds:
        # FLUX.1 [dev]'s scheduler_config.json (shift 3, dynamic shifting from 0.5 to 1.15) with its token counts
        # (256 and 4096: 512 and 1024 px) divided by 16, so tiny latents (8 x 8: 16 tokens) shift differently.
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0,
            use_dynamic_shifting=True,
            base_image_seq_len=16,
            max_image_seq_len=256,
            base_shift=0.5,
            max_shift=1.15,
        )
    else:  # FLUX.1 [schnell]'s scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(out / "tokenizer"),
        text_encoder_2=t5,
        tokenizer_2=CLIPTokenizer.from_pretrained(out / "tokenizer_2"),
        transformer=transformer,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    return out
