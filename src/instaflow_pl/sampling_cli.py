"""``instaflow-pl sample``: an image grid from a velocity model folder (an export) in 1..N Euler steps."""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from instaflow_pl.errors import UserError


@dataclass
class SampleRequest:
    """What ``instaflow-pl sample`` draws.

    Attributes:
        model: Velocity model folder (what ``instaflow-pl export`` writes).
        prompt: The prompt of every image.
        out: PNG file of the grid.
        steps: Euler steps.
        guidance: Classifier-free guidance (1 or less: none).
        seed: Base seed; image i uses the noise of seed + i (``conventions.noise_for_indices``).
        n: Number of images.
        force: Overwrite an existing ``out``.
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1`` ...
        dtype: Weight dtype: ``fp32``, ``fp16`` or ``bf16``.
    """

    model: str
    prompt: str
    out: str
    steps: int = 1
    guidance: float = 0.0
    seed: int = 0
    n: int = 4
    force: bool = False
    device: str = "auto"
    dtype: str = "fp32"


def check_request(request: SampleRequest) -> Path:
    """Validate the numbers and the output file before anything loads; return the output path.

    Raises:
        UserError: steps < 1, guidance < 0, n < 1, an output that is not a .png, or one that exists without force.
    """
    if request.steps < 1:
        raise UserError(f"--steps must be >= 1, got {request.steps}")
    if not math.isfinite(request.guidance) or request.guidance < 0:
        raise UserError(f"--guidance must be >= 0 (1 or less means no guidance), got {request.guidance}")
    if request.n < 1:
        raise UserError(f"--n must be >= 1, got {request.n}")
    out = Path(request.out).expanduser()
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must name a .png file, got {out}")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; name a .png file")
    if out.exists() and not request.force:
        raise UserError(f"{out} already exists; pass --force to overwrite it, or choose another --out")
    return out


def velocity_folder(model: str) -> Path:
    """The local folder of a velocity model; a clear error for anything else.

    Raises:
        UserError: a missing folder, a folder that is not a velocity model, or one missing a part.
    """
    from instaflow_pl.teachers import KIND_FILE, VELOCITY_KIND, model_kind, resolve_model_folder

    root = resolve_model_folder(model)
    if model_kind(root) != VELOCITY_KIND:
        raise UserError(
            f"{root} is not a velocity model (its {KIND_FILE} does not mark it as one); sample draws from rectified "
            "flows such as the folders `instaflow-pl export` writes, not from a Stable Diffusion folder"
        )
    from instaflow_pl.export.folder import is_pixel_space
    from instaflow_pl.families import family_of_folder

    family = family_of_folder(root)
    parts = [family.network_folder, *family.text_parts]
    parts += [] if is_pixel_space(root) else ["vae"]  # the digits demo has no VAE
    for part in parts:
        if not (root / part).is_dir():
            raise UserError(f"{root} has no {part}/ subfolder; a velocity model needs {', '.join(parts)}")
    return root


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for, but no CUDA device is available; use --device cpu")
    return device


def load_pipeline(root: Path, device: str = "auto", dtype: str = "fp32"):
    """``InstaFlowPipeline.from_pretrained(root)`` on ``device`` in ``dtype``, without progress bars."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    from instaflow_pl.pipeline import InstaFlowPipeline
    from instaflow_pl.teachers import parse_dtype

    torch_dtype = parse_dtype(dtype)
    diffusers_logging.disable_progress_bar()
    hf_logging.disable_progress_bar()
    pipe = InstaFlowPipeline.from_pretrained(root, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(_device(device))


def image_grid(images: Sequence, columns: int | None = None):
    """Paste PIL images of one size into a grid (``columns`` defaults to ceil(sqrt(n))), row by row."""
    from PIL import Image

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def sample_images(pipe, request: SampleRequest) -> list:
    """The request's images: image i from the noise of ``seed + i`` (the project's seed rule)."""
    from instaflow_pl.conventions import noise_for_indices

    x0 = noise_for_indices(request.seed, range(request.n), pipe.latent_shape())
    out = pipe(
        [request.prompt] * request.n,
        num_inference_steps=request.steps,
        guidance_scale=request.guidance,
        latents=x0,
        output_type="pil",
    )
    return out.images


def sample(request: SampleRequest) -> Path:
    """Draw the request's images and write them as one PNG grid; return its path.

    Raises:
        UserError: bad numbers, an output that may not be written, or a model folder that is not a velocity model.
    """
    out = check_request(request)
    root = velocity_folder(request.model)
    pipe = load_pipeline(root, request.device, request.dtype)
    images = sample_images(pipe, request)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    image_grid(images).save(tmp, format="PNG")
    tmp.replace(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``instaflow-pl sample``."""
    parser = argparse.ArgumentParser(
        prog="instaflow-pl sample",
        description=(
            "Draw images from a velocity model folder (what `instaflow-pl export` writes) with the project's Euler "
            "sampler and save them as one PNG grid. Image i uses the noise of seed + i, so any image can be redrawn."
        ),
    )
    parser.add_argument("--model", required=True, help="velocity model folder, e.g. outputs/tiny/2rf")
    parser.add_argument("--prompt", required=True, help="text prompt of every image")
    parser.add_argument("--out", required=True, help="PNG file to write (never overwritten without --force)")
    parser.add_argument(
        "--steps", type=int, default=1, help="Euler steps from noise to data, >= 1 (default: %(default)s)"
    )
    parser.add_argument(
        "--guidance",
        type=float,
        default=0.0,
        help="classifier-free guidance scale, >= 0; 1 or less means none (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="base seed: image i uses the noise of seed + i (default: %(default)s)"
    )
    parser.add_argument("--n", type=int, default=4, help="number of images in the grid (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)"
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="weight dtype (default: %(default)s)"
    )
    return parser


def sample_main(args: Iterable[str]) -> None:
    """``instaflow-pl sample``: parse the arguments, draw the grid, print where it went."""
    opts = build_parser().parse_args(list(args))
    request = SampleRequest(**vars(opts))
    out = sample(request)
    print(
        f"wrote {out} ({request.n} images, {request.steps} step(s), guidance {request.guidance}, "
        f"seeds {request.seed}..{request.seed + request.n - 1})"
    )
