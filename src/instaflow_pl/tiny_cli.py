"""``instaflow-pl tiny``: write the tiny folder of a model family (and a tiny CLIP) that the tiny configs use."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from instaflow_pl.errors import UserError
from instaflow_pl.families import FAMILIES, family_named
from instaflow_pl.model_folder import ModelFolder
from instaflow_pl.tiny import build_tiny_clip, build_tiny_images


def tiny_main(args: Sequence[str]) -> None:
    """``instaflow-pl tiny [--family F] [DIR]``: write a family's tiny folder (and optionally a tiny CLIP and a tiny
    captioned image folder)."""
    parser = argparse.ArgumentParser(
        prog="instaflow-pl tiny",
        description="Write a tiny diffusers-format folder of a model family with random weights: what the tiny "
        "configs (configs/tiny/FAMILY/) train and sample in seconds on a CPU.",
    )
    parser.add_argument(
        "out", nargs="?", default=None, help="folder to write (default: outputs/tiny/FAMILY, e.g. outputs/tiny/sd)"
    )
    parser.add_argument(
        "--family",
        default="sd",
        metavar="FAMILY",
        help="model family, one of: "
        + ", ".join(f"{name} ({family.title})" for name, family in FAMILIES.items())
        + "; default: %(default)s",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder already holds a model")
    parser.add_argument("--clip", default=None, help="also write a tiny CLIP folder here (for val/clip@n)")
    parser.add_argument(
        "--images",
        default=None,
        help="also write a tiny captioned image folder here (PNGs + metadata.jsonl, for ImagePromptDataModule: "
        "configs/tiny/sd/perflow_images.yaml reads outputs/tiny/images)",
    )
    opts = parser.parse_args(args)

    family = family_named(opts.family, "--family")
    out = Path(opts.out if opts.out is not None else f"outputs/tiny/{family.name}")
    if (out / "model_index.json").exists():
        try:
            held = ModelFolder.open(out).family.name
        except UserError:  # unreadable: --force rebuilds it
            held = None
        if held is not None and held != family.name:
            raise UserError(
                f"{out} holds a model of the {held} family, not {family.name}; write the {family.name} one to "
                f"another folder (default: outputs/tiny/{family.name})"
            )
    if (out / "model_index.json").exists() and not opts.force:
        print(f"{out} already holds a model (use --force to rebuild)")
    else:
        print(f"wrote {family.build_tiny(out, seed=opts.seed)}")
    if opts.clip is not None:
        if (Path(opts.clip) / "config.json").exists() and not opts.force:
            print(f"{opts.clip} already holds a CLIP model (use --force to rebuild)")
        else:
            print(f"wrote {build_tiny_clip(opts.clip, seed=opts.seed)}")
    if opts.images is not None:
        if (Path(opts.images) / "metadata.jsonl").exists() and not opts.force:
            print(f"{opts.images} already holds images (use --force to rebuild)")
        else:
            print(f"wrote {build_tiny_images(opts.images, seed=opts.seed)}")
