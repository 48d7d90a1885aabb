"""The ``instaflow-pl`` command: LightningCLI subcommands (fit, validate, test, predict) plus project tools.

``instaflow-pl pairs ...`` is ``instaflow-pl predict ...`` (pair generation); ``instaflow-pl tiny DIR`` writes the
tiny Stable-Diffusion-format folder the tiny configs use; ``instaflow-pl export --ckpt CKPT --out DIR`` turns a
training checkpoint into a diffusers-format velocity folder and ``instaflow-pl sample --model DIR ...`` draws an
image grid from one.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from instaflow_pl.errors import UserError

ALIASES = {"pairs": "predict"}
"""Friendlier names for LightningCLI subcommands."""


class InstaFlowCLI(LightningCLI):
    """LightningCLI with the project's defaults: predictions are written by callbacks, never kept in memory."""

    def add_arguments_to_parser(self, parser) -> None:
        """Project-wide parser defaults."""
        if any(getattr(action, "dest", None) == "return_predictions" for action in parser._actions):
            parser.set_defaults({"return_predictions": False})


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind ``error``, if any (jsonargparse and Lightning wrap exceptions raised in user code)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> InstaFlowCLI:
    """Run a LightningCLI subcommand in-process (``args`` as on the command line, without the program name).

    With ``run=False`` the config is parsed and every object instantiated, but nothing runs (``args`` then has no
    subcommand).

    Raises:
        UserError: a problem with the user's config or files, unwrapped from the CLI's own exceptions.
    """
    try:
        return _run_cli(args, run)
    except Exception as err:
        user_error = user_error_in(err)
        if user_error is None and "SaveConfigCallback expected" in str(err):
            user_error = UserError(
                f"{str(err).split(' expected ')[1].split(' to NOT exist')[0]} is left from an earlier run; start the "
                "new run in another trainer.default_root_dir (or with a versioned logger), or resume with --ckpt_path"
            )
        if user_error is None:
            raise
        raise user_error from None


def _check_ckpt_path(argv: Sequence[str]) -> None:
    """A missing checkpoint file is one clear line, not Lightning's traceback."""
    from pathlib import Path

    for i, arg in enumerate(argv):
        if arg.startswith("--ckpt_path="):
            value = arg.split("=", 1)[1]
        elif arg == "--ckpt_path" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        if value not in ("last", "best", "hpc", "registry", "null", "None") and "://" not in value:
            if not Path(value).expanduser().is_file():
                raise UserError(
                    f"checkpoint not found: {value!r} (give a .ckpt file, or 'last' to resume the last one)"
                )


def _run_cli(args: Sequence[str] | None, run: bool) -> InstaFlowCLI:
    import lightning as L

    if args is not None:
        args = list(args)
        if args and args[0] in ALIASES:
            args[0] = ALIASES[args[0]]
    elif len(sys.argv) > 1 and sys.argv[1] in ALIASES:
        # Rewritten in place: DDP's launcher restarts the other ranks with sys.argv.
        sys.argv[1] = ALIASES[sys.argv[1]]
    argv = sys.argv[1:] if args is None else args
    predicting = bool(argv) and argv[0] == "predict"
    # A resumed run rewrites its own config.yaml; a new run never replaces an earlier run's.
    resuming = any(a == "--ckpt_path" or a.startswith("--ckpt_path=") for a in argv)
    _check_ckpt_path(argv)
    return InstaFlowCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={"parser_mode": "omegaconf"},
        # Pair generation records its settings in the dataset's manifest.json; a config.yaml there would be noise.
        save_config_callback=None if predicting else SaveConfigCallback,
        save_config_kwargs={"overwrite": resuming},
        auto_configure_optimizers=False,
        run=run,
    )


def _tiny_main(args: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="instaflow-pl tiny",
        description="Write a tiny Stable-Diffusion-format folder with random weights.",
    )
    parser.add_argument("out", nargs="?", default="outputs/tiny/sd", help="folder to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--force", action="store_true", help="rebuild even if the folder already holds a model")
    opts = parser.parse_args(args)
    from pathlib import Path

    from instaflow_pl.tiny import build_tiny_sd

    if (Path(opts.out) / "model_index.json").exists() and not opts.force:
        print(f"{opts.out} already holds a model (use --force to rebuild)")
        return
    print(f"wrote {build_tiny_sd(opts.out, seed=opts.seed)}")


def _export_main(args: Sequence[str]) -> None:
    from instaflow_pl.export import export_main

    export_main(args)


def _sample_main(args: Sequence[str]) -> None:
    from instaflow_pl.sampling_cli import sample_main

    sample_main(args)


TOOLS = {"tiny": _tiny_main, "export": _export_main, "sample": _sample_main}
"""Project commands that are not LightningCLI subcommands."""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``instaflow-pl`` console script."""
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if args and args[0] in TOOLS:
            TOOLS[args[0]](args[1:])
        else:
            cli_main(argv)
    except UserError as err:
        print(f"instaflow-pl: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
