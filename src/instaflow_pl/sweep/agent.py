"""A sweep on a W&B server: ``instaflow-pl sweep FILE`` creates it and runs an agent on it (``wandb sweep`` then
``wandb agent``); the agent runs each trial's command as W&B builds it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from instaflow_pl.errors import UserError
from instaflow_pl.sweep.command import check_trial_args
from instaflow_pl.sweep.engine import plan
from instaflow_pl.sweep.spec import Sweep


def run_wandb(sweep: Sweep, trials: int | None) -> None:
    """Create the sweep on the W&B server and run an agent on it (``wandb sweep`` then ``wandb agent``).

    Raises:
        UserError: W&B is in offline or disabled mode.
    """
    mode = os.environ.get("WANDB_MODE", "")
    if mode in ("offline", "dryrun", "disabled"):
        raise UserError(
            f"W&B sweeps need a W&B server, and WANDB_MODE={mode}: set WANDB_MODE=online (and `wandb login`), "
            "or add --local to run the trials here"
        )
    check_trial_args(sweep, plan(sweep, 1)[0], (), Path("outputs/sweeps/check"))
    import wandb

    # The agent starts `instaflow-pl` through /usr/bin/env: make this environment's scripts findable.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        sweep_id = wandb.sweep(dict(sweep.raw), project=sweep.project)
        wandb.agent(sweep_id, project=sweep.project, count=trials)
    except (wandb.errors.UsageError, wandb.errors.CommError) as err:
        raise UserError(f"W&B: {' '.join(str(err).split())}") from None
