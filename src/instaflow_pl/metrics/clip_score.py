"""CLIP score of images against their prompts, from a CLIP model in a local folder (or a hub id).

torchmetrics 1.9's ``CLIPScore`` accepts only a fixed list of hub ids and breaks on transformers 5, so this wraps
transformers' ``CLIPModel`` and ``CLIPTokenizer`` directly. Images are preprocessed as tensors with the folder's
image-processor settings (shortest-edge bicubic resize, centre crop, mean/std), so no PIL round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric

from instaflow_pl.errors import UserError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPImageConfig:
    """How CLIP wants its images: resize the shortest edge to ``resize`` (bicubic), centre-crop, normalise."""

    resize: int | None
    crop: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def _size_value(size: Any, key: str) -> int | None:
    if size is None:
        return None
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value is not None else None


def _image_config(name: str, model_image_size: int) -> CLIPImageConfig:
    """The image processor's settings from the folder (or the model's image size and OpenAI's mean/std)."""
    from transformers import CLIPImageProcessor

    try:
        processor = CLIPImageProcessor.from_pretrained(name)
    except OSError:
        return CLIPImageConfig(
            model_image_size, (model_image_size, model_image_size), OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        )
    resize = _size_value(processor.size, "shortest_edge") if getattr(processor, "do_resize", True) else None
    if resize is None and getattr(processor, "do_resize", True):
        resize = _size_value(processor.size, "height")
    crop = None
    if getattr(processor, "do_center_crop", True):
        height, width = _size_value(processor.crop_size, "height"), _size_value(processor.crop_size, "width")
        crop = (height, width) if height and width else None
    mean = tuple(float(v) for v in processor.image_mean)
    std = tuple(float(v) for v in processor.image_std)
    return CLIPImageConfig(resize, crop, mean, std)  # type: ignore[arg-type]


def _looks_local(name: str) -> bool:
    """Whether ``name`` can only be a path: a hub id is ``name`` or ``owner/name`` with no local ``owner`` folder."""
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    return "/" in name and Path(name).parent.is_dir()


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_clip_source(model: str | Path) -> bool:
    """Whether ``model`` is a local CLIP folder (else a hub id); a clear error for a path that does not exist."""
    name = str(model)
    path = Path(name).expanduser()
    if path.exists():
        return True
    if _looks_local(name):
        raise UserError(
            f"CLIP model folder {path} not found: put a CLIP model saved with save_pretrained there (config.json, "
            f"model.safetensors, vocab.json, merges.txt, preprocessor_config.json) or give a hub id"
        )
    return False


def load_clip(model: str | Path) -> tuple[nn.Module, Any, CLIPImageConfig]:
    """Load a CLIP model, its tokenizer and its image settings from a folder (or a hub id).

    Args:
        model: A folder written by ``save_pretrained`` (``config.json``, weights, ``vocab.json``/``merges.txt``,
            ``preprocessor_config.json``) or a hub id such as ``openai/clip-vit-large-patch14``.

    Returns:
        The model (eval mode, frozen), the tokenizer and the image settings.
    """
    name = str(model)
    path = Path(name).expanduser()
    local = check_clip_source(name)
    source = str(path) if local else name
    if not local:
        from instaflow_pl.hub import require_hub

        cached = require_hub(name, "CLIP model")  # fails in seconds without a network, not after the retries
        source = str(cached) if cached is not None else name
    from transformers import CLIPModel, CLIPTokenizer

    try:
        clip = CLIPModel.from_pretrained(source)
        tokenizer = CLIPTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        where = f"folder {path}" if local else f"{name!r} (no such folder; tried as a hub id)"
        raise UserError(f"cannot load the CLIP model {where}: {_first_line(err)}") from None
    clip.eval().requires_grad_(False)
    return clip, tokenizer, _image_config(source, clip.config.vision_config.image_size)


def _embedding(output: Any) -> torch.Tensor:
    """The projected embedding from ``get_*_features`` (a tensor before transformers 5, an output object after)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class CLIPScore(Metric):
    """Mean CLIP score ``100 * max(cos(E_image, E_prompt), 0)`` over every (image, prompt) pair seen.

    The per-pair clamp is the definition of Hessel et al. (2021) and of torchmetrics' docs (torchmetrics' code
    clamps the mean instead; the two agree whenever no cosine is negative, as with real CLIP models and images).
    States are sums, reduced by sum under DDP.

    Args:
        model: A CLIP folder or hub id (see :func:`load_clip`).
        value_range: Range of the images given to ``update`` (default [-1, 1], the project's image convention, as
            ``latents_to_images`` returns them); they are mapped to [0, 1] and clamped.
        kwargs: Passed to ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    score_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, model: str | Path, value_range: tuple[float, float] = (-1.0, 1.0), **kwargs):
        super().__init__(**kwargs)
        self.model, self.tokenizer, self.image_config = load_clip(model)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        config = self.model.config.text_config
        self.max_length = min(int(self.tokenizer.model_max_length), int(config.max_position_embeddings))
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in ``value_range`` to CLIP's pixel values (resized, cropped, normalised)."""
        low, high = self.value_range
        x = ((images.float() - low) / (high - low)).clamp(0.0, 1.0)
        cfg = self.image_config
        if cfg.resize is not None:
            height, width = x.shape[-2:]
            scale = cfg.resize / min(height, width)
            size = (max(cfg.resize, int(height * scale)), max(cfg.resize, int(width * scale)))
            if size != (height, width):
                x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 1.0)
        if cfg.crop is not None:
            x = _center_crop(x, cfg.crop)
        mean = torch.tensor(cfg.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(cfg.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Per-pair CLIP scores, shape (B,), in [0, 100], without touching the metric's state.

        Args:
            images: (B, 3, H, W) in ``value_range``.
            prompts: One prompt per image.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP score needs RGB images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"CLIP score needs one prompt per image: {images.shape[0]} images, {len(prompts)} prompts")
        device = self.score_sum.device
        pixels = self.preprocess(images.to(device)).to(self.model.dtype)
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(device)
        image_emb = _embedding(self.model.get_image_features(pixel_values=pixels)).float()
        text_emb = _embedding(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        ).float()
        cosine = F.cosine_similarity(image_emb, text_emb, dim=-1)
        return 100.0 * cosine.clamp(min=0.0)

    def update(self, images: torch.Tensor, prompts: Sequence[str]) -> None:
        """Add a batch of images with their prompts."""
        scores = self.scores(images, prompts)
        self.score_sum += scores.double().sum()
        self.count += scores.numel()

    def compute(self) -> torch.Tensor:
        """The mean CLIP score (float32 scalar; NaN before any update)."""
        return (self.score_sum / self.count).float()


def _center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    height, width = x.shape[-2:]
    crop_h, crop_w = min(size[0], height), min(size[1], width)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[..., top : top + crop_h, left : left + crop_w]
