"""``instaflow-pl export``: the command line around :func:`~instaflow_pl.export.export_checkpoint`."""

from __future__ import annotations

import argparse
from collections.abc import Iterable

from instaflow_pl.export.delta import DELTA_DTYPES, DELTA_FILE
from instaflow_pl.export.lora import LORA_WEIGHTS_FILE
from instaflow_pl.export.run import EXPORT_FORMATS, LORA_FORMATS, apply_delta, export_checkpoint


def build_parser() -> argparse.ArgumentParser:
    """The command's arguments (``--ckpt``, ``--out``, ``--force``, ``--trust-checkpoint``, ``--lora-format``,
    ``--format``, ``--delta-dtype``; ``--apply-delta`` with ``--to`` instead of ``--ckpt``)."""
    parser = argparse.ArgumentParser(
        prog="instaflow-pl export",
        description=(
            "Export a ReflowModule or DistillModule checkpoint as a diffusers-format folder: the velocity network "
            "(EMA weights when the run kept an EMA), the base model's VAE, text encoders and tokenizers, a scheduler "
            "config, model_index.json (InstaFlowPipeline), instaflow.json (a velocity model: usable as the next "
            "round's teacher or base_model) and a README.md model card. With --format delta: only the trained "
            "network minus its base model's network (PeRFlow's delta weights); --apply-delta DELTA --to MODEL adds "
            "such a delta to MODEL (the base, or another fine-tune of it) and writes the sum as a model folder."
        ),
    )
    parser.add_argument(
        "--ckpt",
        help="Lightning checkpoint (.ckpt) of a ReflowModule or DistillModule run, or a folder of checkpoints "
        "(e.g. outputs/tiny/reflow/checkpoints), whose newest .ckpt is used (required unless --apply-delta)",
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
    parser.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="folder",
        help="folder (default; a diffusers-format model folder) or delta: only the trained network minus the base "
        f"model's network, as {DELTA_FILE} (with instaflow.json recording the base and a README.md), to add to "
        "another fine-tune of the same base with --apply-delta",
    )
    parser.add_argument(
        "--delta-dtype",
        choices=tuple(DELTA_DTYPES),
        default="fp32",
        help="dtype of --format delta: fp32 (default; the network's size, base + delta is the trained network to "
        "float32 rounding) or fp64 (twice the size; base + delta gives it back bit for bit); instaflow.json "
        "records how many elements differ",
    )
    parser.add_argument(
        "--apply-delta",
        metavar="DELTA",
        help="instead of exporting a checkpoint: add the delta folder DELTA (written by --format delta) to the "
        "network of --to and write the sum to --out as a model folder (its other parts from --to)",
    )
    parser.add_argument(
        "--to",
        metavar="MODEL",
        help="with --apply-delta: the diffusers-format model to add the delta to: the delta's base model, or another "
        "fine-tune of it (same family and network architecture)",
    )
    return parser


def export_main(args: Iterable[str]) -> None:
    """``instaflow-pl export``: parse the arguments, export, print where the model went."""
    parser = build_parser()
    opts = parser.parse_args(list(args))
    if opts.apply_delta is not None:
        if opts.to is None or opts.ckpt is not None:
            parser.error("--apply-delta DELTA needs --to MODEL (and no --ckpt)")
        info = apply_delta(opts.apply_delta, opts.to, opts.out, force=opts.force)
        print(f"added the delta {opts.apply_delta} to {opts.to}: wrote {info['out']}")
        return
    if opts.ckpt is None or opts.to is not None:
        parser.error("--ckpt is required (or --apply-delta DELTA --to MODEL to apply a delta)")
    info = export_checkpoint(
        opts.ckpt,
        opts.out,
        force=opts.force,
        trust_checkpoint=opts.trust_checkpoint,
        lora_format=opts.lora_format,
        export_format=opts.format,
        delta_dtype=opts.delta_dtype,
    )
    print(
        f"exported {info['checkpoint']} ({info['module']}, {info['training_steps']} steps, {info['weights']} weights) "
        f"to {info['out']}"
    )
