"""The digits demo: InstaFlow's story (1-RF -> reflow -> 2-RF -> distillation) on scikit-learn's digits, on a CPU.

``make demo`` (or ``instaflow-pl demo``) runs every stage through the project's CLI and ``configs/demo/``; see
:mod:`instaflow_pl.demo.stages`. ``run_demo`` is the same from Python (the notebook uses its small scale).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from instaflow_pl.demo.plan import STAGES, DemoPlan
from instaflow_pl.demo.stages import run_stages

SMALL_REFLOW = [
    "--trainer.max_steps",
    "1000",
    "--trainer.val_check_interval",
    "500",
    "--model.init_args.ema_decay",
    "0.995",
]
"""The notebook's reflow budget (2rf and perflow alike)."""
SMALL_OVERRIDES: dict[str, list[str]] = {
    "1rf": [
        "--trainer.max_steps",
        "2000",
        "--trainer.val_check_interval",
        "500",
        "--model.init_args.ema_decay",
        "0.995",
    ],
    "pairs-1rf": ["--data.init_args.repeats", "500"],
    "2rf": SMALL_REFLOW,
    "pairs-2rf": ["--data.init_args.repeats", "500"],
    "distill-2rf": ["--trainer.val_check_interval", "200"],
    "distill-1rf": ["--trainer.val_check_interval", "200"],
    "distill-2rf:budgets": ["200", "600"],
    "distill-1rf:budgets": ["200", "600"],
    "perflow": SMALL_REFLOW,
    "dmd": ["--trainer.max_steps", "425", "--trainer.val_check_interval", "425"],
}
"""The notebook's scale: 2000 + 1000 + 2 x 600 training steps and 10000 pairs (about two minutes on 2 cores); the
``perflow`` stage (not in the notebook) with the small 2rf stage's budget, the ``dmd`` stage (not in the notebook)
with a tenth of its iterations, as the small students have a tenth of their steps."""
SMALL_EVALUATION = {"samples_per_prompt": 30}


def make_plan(out: str | Path = "outputs/demo", configs: str | Path = "configs/demo", small: bool = False) -> DemoPlan:
    """The demo's plan: full scale (the configs as they are) or ``small`` (the notebook's scale)."""
    configs = Path(configs)
    if not (configs / "1rf.yaml").is_file():
        from instaflow_pl.errors import UserError

        raise UserError(
            f"{configs} holds no demo configs (1rf.yaml ...); run from the repository root or pass --configs"
        )
    overrides = dict(SMALL_OVERRIDES) if small else {}
    return DemoPlan(Path(out), configs, overrides, dict(SMALL_EVALUATION) if small else {})


def run_demo(
    out: str | Path = "outputs/demo",
    stages: Sequence[str] | None = None,
    small: bool = False,
    force: bool = False,
    configs: str | Path = "configs/demo",
    jobs: int = 1,
) -> dict[str, float]:
    """Run the demo's stages (all by default), skipping finished ones; W&B stays offline unless configured.

    Args:
        out: Output folder.
        stages: Stages to run (default: all).
        small: The notebook's small scale.
        force: Redo the chosen stages and those that depend on them.
        configs: Folder of the stage configs.
        jobs: Independent stages at most side by side, each in its own process (see
            :mod:`instaflow_pl.demo.parallel`); 1: every stage in this process on every core.

    Returns:
        Wall seconds of each stage run now.
    """
    os.environ.setdefault("WANDB_MODE", "offline")
    return run_stages(make_plan(out, configs, small), stages, force, jobs)


def demo_main(args: Sequence[str]) -> None:
    """``instaflow-pl demo``: parse the arguments and run the stages."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="instaflow-pl demo",
        description="InstaFlow on handwritten digits: 1-RF -> pairs -> 2-RF (reflow) -> pairs -> one-step student, "
        "plus direct distillation of the 1-RF, piecewise reflow (PeRFlow) of the 1-RF and distribution-matching "
        "distillation (DMD2) of the 2-RF against the 1-RF's scores; writes report.md/json, "
        "grid.png and straightness.png to --out. "
        "Finished stages are skipped on a rerun.",
    )
    parser.add_argument(
        "--stage", action="append", choices=STAGES, help="run only this stage (repeatable; default: all, in order)"
    )
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    parser.add_argument("--configs", default="configs/demo", help="folder of the stage configs (default: %(default)s)")
    parser.add_argument("--small", action="store_true", help="the notebook's small scale (about two minutes)")
    parser.add_argument(
        "--force", action="store_true", help="redo the chosen stages (default: all) and the stages that depend on them"
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="independent stages (after pairs-1rf) at most side by side, each in its own process on cores/jobs "
        "threads, its output in <out>/logs/<stage>.log; 1: every stage in this process on every core (default: 2 "
        "on a machine with 2 or more cores). A stage's threads follow from --jobs alone, so its numbers do not "
        "depend on what runs beside it; they differ from --jobs 1 in the last bits",
    )
    opts = parser.parse_args(args)
    if opts.jobs is not None and opts.jobs < 1:
        parser.error(f"--jobs must be 1 or more, got {opts.jobs}")
    from instaflow_pl.runtime import available_cores

    jobs = opts.jobs if opts.jobs is not None else min(2, available_cores())
    times = run_demo(opts.out, opts.stage, opts.small, opts.force, opts.configs, jobs)
    if times:
        print(
            "wall time: "
            + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
            + f" (total {sum(times.values()):.0f} s)"
        )
    report = Path(opts.out) / "report.md"
    if report.is_file():
        print(f"report: {report}")
