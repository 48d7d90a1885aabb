"""Tiny model folders with random weights (SD 1.x, SDXL, SD3, CLIP) for tests, benchmarks, the tiny configs and users.

Each family's folder has every part its released counterpart has (denoising network, VAE, text encoders and
tokenizers, scheduler, ``model_index.json``) and loads through exactly the same code, but runs in milliseconds on a
CPU. Also here: a tiny CLIP folder (CLIP score), a folder of reference images (FID), and SD 1.5's architecture with
random weights (memory and speed checks).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_WORDS = (
    "a an the of in on with and photo picture painting drawing digit handwritten cat dog horse bird car "
    "red green blue yellow black white small big old young man woman city street forest mountain river sea "
    "sky house tree flower riding sitting standing on top zero one two three four five six seven eight nine"
).split()
"""Words the tiny tokenizer knows as single tokens; everything else is spelled out character by character."""


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = keep[:]
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, [chr(c) for c in chars], strict=True))


def write_tiny_tokenizer(out: Path, max_length: int = 77) -> int:
    """Write a small CLIP BPE tokenizer (vocab.json, merges.txt, configs) to ``out``; return its vocabulary size."""
    out.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges: list[str] = []
    for word in TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for nxt in pieces[1:]:
            merge = f"{current} {nxt}"
            current = current + nxt
            if merge not in merges:
                merges.append(merge)
                vocab_list.append(current)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    config = {
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "tokenizer_class": "CLIPTokenizer",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2)
    )
    return len(vocab)


def tiny_text_config(vocab_size: int, max_length: int = 77) -> dict[str, int]:
    """The tiny CLIP text tower's settings (2 layers of width 32) for a tokenizer of ``vocab_size`` tokens."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": max_length,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    }


def _refuse_foreign(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").exists():
        from instaflow_pl.errors import UserError

        raise UserError(f"{out} exists and is not empty; choose a new folder for the model")


def _save_sd_folder(out: Path, unet, vae, text_config: dict[str, int]) -> Path:
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


def build_tiny_sd(out_dir: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a tiny Stable-Diffusion-format folder with random weights to ``out_dir``.

    Latents are 4 x ``sample_size`` x ``sample_size``; the VAE maps them to RGB images twice as large.

    Args:
        out_dir: Folder to create (must not hold anything else).
        seed: Seed of the random weights, so two builds are identical.
        sample_size: Latent height and width.

    Returns:
        The folder's path.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    out = Path(out_dir)
    _refuse_foreign(out)
    vocab_size = write_tiny_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=4,
        norm_num_groups=16,
        sample_size=sample_size * 2,
    )
    return _save_sd_folder(out, unet, vae, tiny_text_config(vocab_size))


def _tiny_vae(sample_size: int, latent_channels: int = 4, **extra):
    """A two-block VAE (2 pixels per latent pixel) with ``latent_channels`` channels."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        latent_channels=latent_channels,
        norm_num_groups=16,
        sample_size=sample_size * 2,
        **extra,
    )


def _clip_towers(out: Path, names: tuple[str, ...], widths: tuple[int, ...], projection: bool) -> list:
    """Tiny CLIP text towers (random, seeded by the caller), and the tiny tokenizer written once per name."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    towers = []
    for name, width in zip(names, widths, strict=True):
        vocab_size = write_tiny_tokenizer(out / name.replace("text_encoder", "tokenizer"))
        config = CLIPTextConfig(**{**tiny_text_config(vocab_size), "hidden_size": width, "projection_dim": width})
        with_projection = projection or name == "text_encoder_2"
        towers.append((CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config))
    return towers


def build_tiny_sdxl(out_dir: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
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
    _refuse_foreign(out)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _clip_towers(out, ("text_encoder", "text_encoder_2"), (16, 32), projection=False)
    time_width = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16 + 32,
        attention_head_dim=8,
        norm_num_groups=16,
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
        vae=_tiny_vae(sample_size),
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


def build_tiny_sd3(out_dir: str | Path, seed: int = 0, sample_size: int = 8, with_t5: bool = True) -> Path:
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
    _refuse_foreign(out)
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = _clip_towers(out, ("text_encoder", "text_encoder_2"), (16, 32), projection=True)
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
    vae = _tiny_vae(
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

    out = Path(out_dir)
    _refuse_foreign(out)
    vocab_size = write_tiny_tokenizer(out / "tokenizer")
    torch.manual_seed(seed)
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
    return _save_sd_folder(out, unet, vae, text)


def build_tiny_clip(out_dir: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny CLIP model folder with random weights (model, tokenizer, image processor) to ``out_dir``.

    It has the layout of a real CLIP folder (e.g. ``openai/clip-vit-base-patch32`` saved with ``save_pretrained``) and
    loads through :class:`instaflow_pl.metrics.CLIPScore` like one, for tests and the tiny configs.

    Args:
        out_dir: Folder to create (must not hold anything else).
        seed: Seed of the random weights, so two builds are identical.
        image_size: Side of the square images the vision tower takes (a multiple of its patch size, 8).

    Returns:
        The folder's path.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not (out / "config.json").exists():
        from instaflow_pl.errors import UserError

        raise UserError(f"{out} exists and is not empty; choose a new folder for the tiny CLIP model")
    vocab_size = write_tiny_tokenizer(out)
    text_config = tiny_text_config(vocab_size)
    vision_config = {
        "image_size": image_size,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=16))
    model.save_pretrained(out, safe_serialization=True)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(out)
    return out


def build_tiny_reference(out_dir: str | Path, count: int = 32, size: int = 16, seed: int = 0) -> Path:
    """Write ``count`` small RGB PNG images (smooth seeded colour fields) as a tiny reference folder for evaluation.

    They stand in for real images (COCO val) in the tiny evaluation config and the tests: FID against them checks the
    plumbing, not image quality.

    Args:
        out_dir: Folder to create (must not hold other files).
        count: Number of images.
        size: Their side in pixels.
        seed: Seed of the pictures, so two builds are identical.

    Returns:
        The folder's path.
    """
    import numpy as np
    from PIL import Image

    out = Path(out_dir)
    names = {f"{i:05d}.png" for i in range(count)}
    if out.exists() and any(p.name not in names for p in out.iterdir()):
        from instaflow_pl.errors import UserError

        raise UserError(f"{out} holds other files; choose a new folder for the tiny reference images")
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        coarse = torch.rand(1, 3, 4, 4, generator=generator)
        image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(out / f"{i:05d}.png")
    return out
