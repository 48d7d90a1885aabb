"""``instaflow-pl export``: the command line around :func:`~instaflow_pl.export.export_checkpoint`."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from instaflow_pl.export.lora import LORA_WEIGHTS_FILE
from instaflow_pl.export.run import LORA_FORMATS, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (``--ckpt``, ``--out``, ``--force``, ``--trust-checkpoint``, ``--lora-format``)."""
    parser = argparse.ArgumentParser(
        prog="instaflow-pl export",
        description=(
            "Export a ReflowModule or DistillModule checkpoint as a diffusers-format folder: the velocity network "
            "(EMA weights when the run kept an EMA), the base model's VAE, text encoders and tokenizers, a scheduler "
            "config, model_index.json (InstaFlowPipeline), instaflow.json (a velocity model: usable as the next "
            "round's teacher or base_model) and a README.md model card."
        ),
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        help="Lightning checkpoint (.ckpt) of a ReflowModule or DistillModule run, or a folder of checkpoints "
        "(e.g. outputs/tiny/reflow/checkpoints), whose newest .ckpt is used",
    )
    parser.add_argument(
        "--out", required=True, help="folder to write: new or empty (or an earlier export, with --force)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace an earlier export in --out; a folder holding any other files is never overwritten",
    )
    parser.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="load checkpoints holding arbitrary pickled objects (this runs code from the file: only for files "
        "from a trusted source); by default only tensors and plain data are read",
    )
    parser.add_argument(
        "--lora-format",
        choices=LORA_FORMATS,
        default="merged",
        help="for a run that trained LoRA adapters: merged (default; a whole model folder, usable as the next "
        f"teacher) or file ({LORA_WEIGHTS_FILE} for diffusers' pipe.load_lora_weights(DIR))",
    )
    return parser


def export_main(args: Iterable[str]) -> None:
    """``instaflow-pl export``: parse the arguments, export, print where the model went."""
    opts = build_parser().parse_args(list(args))
    info = export_checkpoint(
        opts.ckpt, opts.out, force=opts.force, trust_checkpoint=opts.trust_checkpoint, lora_format=opts.lora_format
    )
    print(
        f"exported {info['checkpoint']} ({info['module']}, {info['training_steps']} steps, {info['weights']} weights) "
        f"to {info['out']}"
    )
