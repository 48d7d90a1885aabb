"""The ``instaflow-pl`` command: LightningCLI subcommands (fit, validate, test, predict) plus project tools.

``instaflow-pl pairs ...`` is ``instaflow-pl predict ...`` (pair generation); ``instaflow-pl tiny [--family F] DIR``
writes the tiny folder of a model family that the tiny configs use; ``instaflow-pl export --ckpt CKPT --out DIR``
turns a training checkpoint into a diffusers-format model folder and ``instaflow-pl sample --model DIR ...`` draws an
image grid from one; ``instaflow-pl sweep --local SWEEP.yaml`` runs a W&B-format sweep offline, trial by trial;
``instaflow-pl evaluate --config configs/eval/coco5k.yaml`` is ``predict`` with the evaluation module (FID, CLIP).
This module only dispatches: the LightningCLI runner is :mod:`instaflow_pl.lightning_cli`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from instaflow_pl.errors import UserError
from instaflow_pl.lightning_cli import cli_main  # sets OpenMP's waiting before torch loads (instaflow_pl.runtime)


def _tiny_main(args: Sequence[str]) -> None:
    from instaflow_pl.tiny_cli import tiny_main

    tiny_main(args)


def _export_main(args: Sequence[str]) -> None:
    from instaflow_pl.export.command import export_main

    export_main(args)


def _sample_main(args: Sequence[str]) -> None:
    from instaflow_pl.sampling_cli import sample_main

    sample_main(args)


def _sweep_main(args: Sequence[str]) -> None:
    from instaflow_pl.sweep.main import sweep_main

    sweep_main(args)


def _demo_main(args: Sequence[str]) -> None:
    from instaflow_pl.demo import demo_main

    demo_main(args)


TOOLS = {"tiny": _tiny_main, "export": _export_main, "sample": _sample_main, "sweep": _sweep_main, "demo": _demo_main}
"""Project commands that are not LightningCLI subcommands."""

COMMANDS = {
    "fit": "train a ReflowModule (reflow, k-RF) or DistillModule (one-step student) from a config",
    "validate": "run a trained module's validation (straightness, FID, CLIP score) once",
    "test": "run a trained module's test loop",
    "predict": "LightningCLI predict (pair generation is `pairs`)",
    "pairs": "generate (X0, X1, prompt) pairs with a teacher over every rank (predict with the pairs config)",
    "export": "turn a training checkpoint into a diffusers-format model folder (loads with stock diffusers)",
    "sample": "draw an image grid from an exported model folder",
    "tiny": "write a tiny model folder of a family (--family sd, sdxl, sd3, flux, digits) and a tiny CLIP",
    "demo": "InstaFlow on handwritten digits, every stage on a CPU: 1-RF -> 2-RF -> one-step student, report",
    "sweep": "a W&B-format hyperparameter sweep (W&B agent, or local trials with --local)",
    "evaluate": "the paper's evaluation protocol (FID, CLIP score, speed) on exported models",
}
"""Every command with its one-line description (``instaflow-pl --help``)."""


def print_help() -> None:
    """``instaflow-pl --help``: the commands, one line each."""
    width = max(map(len, COMMANDS))
    lines = ["usage: instaflow-pl COMMAND [options]   (instaflow-pl COMMAND --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {text}" for name, text in COMMANDS.items()]
    lines += ["", "Configs: configs/<setting>/<stage>.yaml (tiny, demo, sd15); `make help` lists the Make targets."]
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``instaflow-pl`` console script (quiet library output, threads chosen for the machine)."""
    from instaflow_pl.runtime import command, quiet

    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print_help()
        return
    try:
        with command(), quiet():
            if args[0] in TOOLS:
                TOOLS[args[0]](args[1:])
            else:
                cli_main(argv)
    except UserError as err:
        if not getattr(err, "printed_by_rank_zero", False):  # under DDP, another rank's error is printed once
            print(f"instaflow-pl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
