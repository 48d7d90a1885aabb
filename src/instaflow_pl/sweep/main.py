"""The ``instaflow-pl sweep`` command: a sweep file run on a W&B server, or here with ``--local``."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from instaflow_pl.errors import UserError
from instaflow_pl.sweep.agent import run_wandb
from instaflow_pl.sweep.local import run_local
from instaflow_pl.sweep.spec import load_sweep


def sweep_main(argv: Sequence[str]) -> None:
    """``instaflow-pl sweep``: run a sweep file on W&B, or here with ``--local``."""
    argv = list(argv)
    overrides: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, overrides = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        prog="instaflow-pl sweep",
        description="Run a W&B-format sweep file: on a W&B server (wandb sweep + wandb agent), or with --local here, "
        "each trial a fresh `instaflow-pl fit` in OUT/trial-NNN, with a summary sorted by the sweep's metric.",
        epilog="Overrides for every trial go after --, e.g. -- --trainer.max_steps=100 --data.init_args.path=DIR",
    )
    parser.add_argument("sweep", help="sweep file, e.g. configs/sweeps/reflow_lr_tdist.yaml")
    parser.add_argument("--local", action="store_true", help="run the trials here, without a W&B server")
    parser.add_argument("--trials", type=int, default=None, help="number of trials (default: every grid point, or 4)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the engine's draws (default: %(default)s)")
    parser.add_argument("--out", default=None, help="folder of the trials (default: outputs/sweeps/NAME-TIME)")
    parser.add_argument("--dry-run", action="store_true", help="check the sweep and print the trial commands only")
    opts = parser.parse_args(argv)
    sweep = load_sweep(opts.sweep)
    if not opts.local:
        if overrides:
            raise UserError("overrides after -- apply to --local runs only; put them in the sweep's command")
        run_wandb(sweep, opts.trials)
        return
    run_local(sweep, opts.trials, opts.seed, opts.out, overrides, dry_run=opts.dry_run)
