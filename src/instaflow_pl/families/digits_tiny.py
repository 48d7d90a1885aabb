"""Folders of the digits family: the demo's base (a randomly initialised MLP velocity, a tiny CLIP text encoder and
tokenizer, no VAE) and a smaller one for tests.

A digits folder has the layout of every other model folder (``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``model_index.json``, ``instaflow.json``) but no ``vae/``: the demo works in pixel space.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from instaflow_pl.errors import UserError

PROMPT_TOKENS = 16
"""Tokens per prompt in the demo's tokenizer ("a handwritten digit seven" takes 6 with start and end)."""


def build_digits_base(
    out_dir: str | Path, seed: int = 0, width: int = 256, num_blocks: int = 4, sample_size: int = 8
) -> Path:
    """Write a digits folder (random weights, fixed by ``seed``) to ``out_dir``: the demo's base by default.

    Args:
        out_dir: Folder to create (absent or empty).
        seed: Seed of the random weights, so two builds are identical.
        width: Hidden width of the MLP velocity.
        num_blocks: Its residual blocks.
        sample_size: Image height and width (the digits are 8 x 8).

    Returns:
        The folder's path.
    """
    import diffusers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from instaflow_pl.model_folder import mark_velocity_folder
    from instaflow_pl.tiny import tiny_text_config, write_tiny_tokenizer
    from instaflow_pl.velocity.mlp import MLPVelocityNet

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose a new folder for the digits base model")
    vocab_size = write_tiny_tokenizer(out / "tokenizer", max_length=PROMPT_TOKENS)
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(**tiny_text_config(vocab_size, PROMPT_TOKENS))
    CLIPTextModel(text_config).save_pretrained(out / "text_encoder", safe_serialization=True)
    net = MLPVelocityNet(
        sample_size=sample_size,
        width=width,
        num_blocks=num_blocks,
        cross_attention_dim=text_config.hidden_size,
        text_tokens=PROMPT_TOKENS,
    )
    net.save_pretrained(out / "unet", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0).save_pretrained(out / "scheduler")
    index = {
        "_class_name": "InstaFlowPipeline",
        "_diffusers_version": diffusers.__version__,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["instaflow_pl.velocity.mlp", "MLPVelocityNet"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    description = "digits demo base: random MLP velocity, pixel space"
    mark_velocity_folder(out, family="digits", stages=[], description=description)
    return out


def build_tiny(out_dir: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """Write a small digits folder (MLP width 32, one block) for tests and the tiny configs."""
    return build_digits_base(out_dir, seed=seed, width=32, num_blocks=1, sample_size=sample_size)
