"""The local runner (``instaflow-pl sweep --local``): W&B's engine proposes each trial, which runs as its own
``instaflow-pl`` process in ``OUT/trial-NNN``; the engine sees each result before proposing the next."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instaflow_pl.errors import UserError
from instaflow_pl.sweep.command import METRICS_FILE, check_trial_args, local_command, trial_args
from instaflow_pl.sweep.engine import DEFAULT_RANDOM_TRIALS, plan, propose
from instaflow_pl.sweep.spec import Sweep, TrialResult
from instaflow_pl.sweep.summary import short_name, write_summary


def run_local(
    sweep: Sweep,
    trials: int | None = None,
    seed: int = 0,
    out: str | Path | None = None,
    overrides: Sequence[str] = (),
    dry_run: bool = False,
) -> list[TrialResult]:
    """Run a sweep here: W&B's engine proposes each trial, run as a fresh ``instaflow-pl`` process in
    ``out/trial-NNN``, and sees its result before proposing the next.

    Args:
        sweep: The sweep.
        trials: How many trials (None: every grid point, or 4 for random and bayes).
        seed: Seed of the engine's random draws.
        out: Folder of the trials and the summary (default ``outputs/sweeps/<name>-<time>``).
        overrides: Command-line overrides for every trial (e.g. ``--trainer.max_steps=2``).
        dry_run: Print the commands of the trials proposed before any result, and stop.

    Returns:
        The trials' results, in trial order.

    Raises:
        UserError: a bad sweep file, a parameter the command does not accept, an output folder that already holds a
            sweep, or every trial failed.
    """
    if trials is not None and trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    notes: list[str] = []
    if sweep.method == "grid":
        size = len(plan(sweep, seed=seed))
        if trials is not None and trials < size:
            notes.append(f"running the first {trials} of the {size} grid points")
        elif trials is not None and trials > size:
            notes.append(f"the grid has only {size} points")
        total = min(trials or size, size)
    else:
        total = trials if trials is not None else DEFAULT_RANDOM_TRIALS
        if trials is None:
            notes.append(f"{sweep.method} search: {total} trials (--trials N for more)")
    if out is None:
        out = Path("outputs/sweeps") / f"{sweep.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if out.exists() and any(out.glob("trial-*")):
        raise UserError(f"{out} already holds a sweep's trials; choose another --out")
    for note in notes:
        print(f"note: {note}")
    first = plan(sweep, 1, seed)[0]
    check_trial_args(sweep, first, overrides, out / "trial-001")
    if dry_run:
        for i, params in enumerate(plan(sweep, total, seed), 1):
            args = trial_args(local_command(sweep, params), out / f"trial-{i:03d}", overrides)
            print(" ".join(_quote(part) for part in ["instaflow-pl", *args]))
        if sweep.method == "bayes" and total > 1:
            print("note: bayes proposes each trial from the results before it; these are its guesses without results")
        return []
    env = {**os.environ}
    env.setdefault("WANDB_MODE", "offline")  # a local sweep needs no server; `wandb sync` uploads the runs later
    env.setdefault("WANDB_RUN_GROUP", out.name)
    results: list[TrialResult] = []
    interrupted = False
    try:
        while len(results) < total:
            params = propose(sweep, results, seed=seed)
            if params is None:
                break
            results.append(run_trial(sweep, len(results) + 1, total, params, out, overrides, env))
    except KeyboardInterrupt:  # Ctrl-C: summarise the finished trials, then stop
        if not results:
            raise
        interrupted = True
        notes = [*notes, f"interrupted after {len(results)} of {total} trials"]
    table = write_summary(sweep, results, out, seed, notes)
    print(table)
    print(f"summary: {out / 'summary.md'}, {out / 'summary.json'}")
    if interrupted:
        raise SystemExit(130)
    if all(result.returncode != 0 for result in results):
        raise UserError(f"every trial failed; see {results[0].directory / 'log.txt'}")
    return results


def run_trial(
    sweep: Sweep,
    index: int,
    total: int,
    params: dict[str, Any],
    out: Path,
    overrides: Sequence[str],
    env: dict[str, str],
) -> TrialResult:
    """Run trial ``index`` (1-based) with the values ``params`` as its own process, and read its final metrics."""
    directory = out / f"trial-{index:03d}"
    directory.mkdir(parents=True)
    command = [
        sys.executable,
        "-m",
        "instaflow_pl.cli",
        *trial_args(local_command(sweep, params), directory, overrides),
    ]
    shown = ", ".join(f"{short_name(name, sweep)}={value}" for name, value in params.items())
    print(f"trial {index}/{total}: {shown}", flush=True)
    start = time.monotonic()
    with (directory / "log.txt").open("w") as log:
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    metrics_file = directory / METRICS_FILE
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    result = TrialResult(index, params, directory, command, code, metrics, time.monotonic() - start)
    value = result.value(sweep.metric)
    outcome = f"{sweep.metric}={value:.6g}" if value is not None else f"no {sweep.metric}"
    if code != 0:
        outcome = f"{result.status}: {_last_line(directory / 'log.txt')} (log: {directory / 'log.txt'})"
    print(f"  -> {outcome} ({result.seconds:.1f} s)", flush=True)
    return result


def _quote(part: str) -> str:
    return part if re.fullmatch(r"[\w@%+=:,./-]+", part) else "'" + part.replace("'", "'\\''") + "'"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "no output"
