"""The parts tiny model folders share (a CLIP BPE tokenizer, CLIP text towers, a two-block VAE), a tiny CLIP model
(CLIP score), a folder of reference images (FID) and a captioned image folder (training from images), all with random
weights, for tests, benchmarks and users.

Each family's tiny folder is built by the fixture beside its file (``families/<name>_tiny.py``, reached through
``FAMILIES[name].build_tiny``): every part its released counterpart has, loading through the same code, running in
milliseconds on a CPU.
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


def refuse_foreign(out: Path) -> None:
    """A clear error when ``out`` holds files that are not a model folder (never overwrite what a user made)."""
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").exists():
        from instaflow_pl.errors import UserError

        raise UserError(f"{out} exists and is not empty; choose a new folder for the model")


def tiny_unet_config(sample_size: int) -> dict[str, object]:
    """What every tiny ``UNet2DConditionModel`` shares (two blocks of width 32 and 64 on 4-channel latents); a family
    adds its block types and text width."""
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 1,
        "block_out_channels": (32, 64),
        "attention_head_dim": 8,
        "norm_num_groups": 16,
    }


def tiny_vae(sample_size: int, latent_channels: int = 4, **extra):
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


def clip_towers(out: Path, names: tuple[str, ...], widths: tuple[int, ...], projection: bool) -> list:
    """Tiny CLIP text towers (random, seeded by the caller), and the tiny tokenizer written once per name."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    towers = []
    for name, width in zip(names, widths, strict=True):
        vocab_size = write_tiny_tokenizer(out / name.replace("text_encoder", "tokenizer"))
        config = CLIPTextConfig(**{**tiny_text_config(vocab_size), "hidden_size": width, "projection_dim": width})
        with_projection = projection or name == "text_encoder_2"
        towers.append((CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config))
    return towers


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
    from PIL import Image

    out = _image_folder(out_dir, count, set(), "tiny reference images")
    generator = torch.Generator().manual_seed(seed)
    for i in range(count):
        Image.fromarray(_smooth_pixels(generator, size)).save(out / f"{i:05d}.png")
    return out


def _image_folder(out_dir: str | Path, count: int, extra: set[str], what: str) -> Path:
    """``out_dir``, created; one line when it holds files other than the ``count`` PNGs and ``extra`` it will get."""
    out = Path(out_dir)
    names = {f"{i:05d}.png" for i in range(count)} | extra
    if out.exists() and any(p.name not in names for p in out.iterdir()):
        from instaflow_pl.errors import UserError

        raise UserError(f"{out} holds other files; choose a new folder for the {what}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _smooth_pixels(generator: torch.Generator, size: int):
    """A ``size`` x ``size`` RGB uint8 array: a seeded 4 x 4 colour field, bilinearly upsampled."""
    import numpy as np

    coarse = torch.rand(1, 3, 4, 4, generator=generator)
    image = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]
    return (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


TINY_IMAGE_COLOURS = ("red", "green", "blue")


def build_tiny_images(out_dir: str | Path, count: int = 16, size: int = 16, seed: int = 0) -> Path:
    """Write an image folder with captions (the Hugging Face imagefolder layout ``ImagePromptDataModule`` reads):
    ``count`` smooth seeded colour fields as PNGs and a ``metadata.jsonl`` whose ``text`` names each image's
    strongest colour channel ("a red picture").

    They stand in for a captioned image set (LAION, COCO) in the tiny configs that train from images
    (``configs/tiny/sd/perflow_images.yaml``) and in the tests.

    Args:
        out_dir: Folder to create (must not hold other files).
        count: Number of images.
        size: Their side in pixels.
        seed: Seed of the pictures, so two builds are identical.

    Returns:
        The folder's path.
    """
    from PIL import Image

    from instaflow_pl.data.images import METADATA_FILE

    out = _image_folder(out_dir, count, {METADATA_FILE}, "tiny images")
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(count):
        pixels = _smooth_pixels(generator, size)
        Image.fromarray(pixels).save(out / f"{i:05d}.png")
        colour = TINY_IMAGE_COLOURS[int(pixels.reshape(-1, 3).mean(axis=0).argmax())]
        rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": f"a {colour} picture"}))
    (out / METADATA_FILE).write_text("\n".join(rows) + "\n")
    return out
