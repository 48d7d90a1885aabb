"""The ``instaflow-pl`` command: LightningCLI subcommands (fit, validate, test, predict) plus project tools.

``instaflow-pl pairs ...`` is ``instaflow-pl predict ...`` (pair generation); ``instaflow-pl tiny DIR`` writes the
tiny Stable-Diffusion-format folder the tiny configs use; ``instaflow-pl export --ckpt CKPT --out DIR`` turns a
training checkpoint into a diffusers-format velocity folder and ``instaflow-pl sample --model DIR ...`` draws an
image grid from one; ``instaflow-pl sweep --local SWEEP.yaml`` runs a W&B-format sweep offline, trial by trial.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from instaflow_pl.errors import UserError

ALIASES = {"pairs": "predict"}
"""Friendlier names for LightningCLI subcommands."""


class LoggedConfigCallback(SaveConfigCallback):
    """Saves ``config.yaml`` in the log folder, as LightningCLI does, and logs the same resolved config to every logger
    (with W&B: the run's config, so a run records exactly how it was launched)."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        """Log the config as nested hyperparameters (``model.init_args.optimizer.init_args.lr`` ...)."""
        if trainer.loggers:
            import yaml

            config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
            for logger in trainer.loggers:
                logger.log_hyperparams(config)


class InstaFlowCLI(LightningCLI):
    """LightningCLI with the project's defaults: predictions are written by callbacks, never kept in memory."""

    trust_checkpoint = False
    """Set for a run with --weights_only=false: the checkpoint is then read only by the Trainer, with full pickle."""

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyperparameters with weights_only=True before the run, which refuses a
        # pickle checkpoint even when the user trusts it; with --weights_only=false that pre-read is skipped.
        if not self.trust_checkpoint:
            super()._parse_ckpt_path()

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        # The trainer method's own arguments (return_predictions, weights_only) exist only after the base class
        # has built the subcommand parser, so the project's defaults for them are set here.
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        dests = {getattr(action, "dest", None) for action in parser._actions}
        if "return_predictions" in dests:
            parser.set_defaults({"return_predictions": False})  # predictions are written by callbacks
        if "weights_only" in dests:
            # Checkpoints are read without pickle: a crafted file cannot run code. --weights_only=false trusts it.
            parser.set_defaults({"weights_only": True})
        return parser


def user_error_in(error: BaseException) -> UserError | None:
    """The UserError behind ``error``, if any (jsonargparse and Lightning wrap exceptions raised in user code)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _unpickling_error_in(error: BaseException | None) -> bool:
    import pickle

    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, pickle.UnpicklingError):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def cli_main(args: Sequence[str] | None = None, run: bool = True) -> InstaFlowCLI:
    """Run a LightningCLI subcommand in-process (``args`` as on the command line, without the program name).

    With ``run=False`` the config is parsed and every object instantiated, but nothing runs (``args`` then has no
    subcommand).

    Raises:
        UserError: a problem with the user's config or files, unwrapped from the CLI's own exceptions.
    """
    earlier_wandb_run, failed = _wandb_run(), True
    try:
        cli = _run_cli(args, run)
        failed = False
        return cli
    except Exception as err:
        user_error = user_error_in(err)
        if user_error is None and "ConfigCallback expected" in str(err):
            user_error = UserError(
                f"{str(err).split(' expected ')[1].split(' to NOT exist')[0]} is left from an earlier run; start the "
                "new run in another trainer.default_root_dir (or with a versioned logger), or resume with --ckpt_path"
            )
        if user_error is None and _unpickling_error_in(err):
            user_error = UserError(
                "the checkpoint holds objects that are not plain data, so it was not loaded (loading them could run "
                "code from the file); pass --weights_only=false only if you trust its source"
            )
        if user_error is None:
            raise
        raise user_error from None
    finally:
        if run:
            _finish_wandb_run(earlier_wandb_run, failed)


def _wandb_run():
    """The active W&B run of this process, if wandb was imported."""
    wandb = sys.modules.get("wandb")
    return getattr(wandb, "run", None)


def _finish_wandb_run(earlier, failed: bool) -> None:
    """Finish the W&B run a subcommand started (WandbLogger leaves it open), so its files are complete and the next
    in-process run gets a run of its own."""
    current = _wandb_run()
    if current is not None and current is not earlier:
        current.finish(exit_code=1 if failed else 0)


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
    # LightningCLI reads a checkpoint's hyperparameters with weights_only=True before the run; a user who trusts a
    # pickle checkpoint (--weights_only=false) gets neither that pre-read nor the safe load.
    trusting = any(a.lower() == "--weights_only=false" for a in argv) or any(
        a == "--weights_only" and b.lower() == "false" for a, b in zip(argv, argv[1:], strict=False)
    )
    _check_ckpt_path(argv)
    # omegaconf+ resolves ${...} interpolations after the command-line overrides, so --trainer.default_root_dir=DIR
    # moves everything configured as ${trainer.default_root_dir}/... (checkpoints, the W&B run) along with it;
    # interpolations written from the config's root keep working under a subcommand (fit.trainer...).
    from jsonargparse import set_parsing_settings

    set_parsing_settings(omegaconf_absolute_to_relative_paths=True)
    cli_class = type("InstaFlowCLI", (InstaFlowCLI,), {"trust_checkpoint": trusting}) if trusting else InstaFlowCLI
    return cli_class(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        parser_kwargs={"parser_mode": "omegaconf+"},
        # Pair generation records its settings in the dataset's manifest.json; a config.yaml there would be noise.
        save_config_callback=None if predicting else LoggedConfigCallback,
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
    parser.add_argument("--clip", default=None, help="also write a tiny CLIP folder here (for val/clip@n)")
    opts = parser.parse_args(args)
    from pathlib import Path

    from instaflow_pl.tiny import build_tiny_clip, build_tiny_sd

    if (Path(opts.out) / "model_index.json").exists() and not opts.force:
        print(f"{opts.out} already holds a model (use --force to rebuild)")
    else:
        print(f"wrote {build_tiny_sd(opts.out, seed=opts.seed)}")
    if opts.clip is not None:
        if (Path(opts.clip) / "config.json").exists() and not opts.force:
            print(f"{opts.clip} already holds a CLIP model (use --force to rebuild)")
        else:
            print(f"wrote {build_tiny_clip(opts.clip, seed=opts.seed)}")


def _export_main(args: Sequence[str]) -> None:
    from instaflow_pl.export import export_main

    export_main(args)


def _sample_main(args: Sequence[str]) -> None:
    from instaflow_pl.sampling_cli import sample_main

    sample_main(args)


def _sweep_main(args: Sequence[str]) -> None:
    from instaflow_pl.sweep import sweep_main

    sweep_main(args)


TOOLS = {"tiny": _tiny_main, "export": _export_main, "sample": _sample_main, "sweep": _sweep_main}
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
