"""W&B's sweep engine proposing the trials: each trial's values from what the engine has been shown, seeded."""

from __future__ import annotations

import contextlib
import hashlib
import random
import warnings
from collections.abc import Sequence
from typing import Any

from instaflow_pl.sweep.spec import Sweep, TrialResult, wandb_sweeps

DEFAULT_RANDOM_TRIALS = 4
"""Trials of a random or bayes sweep when none are asked for."""


@contextlib.contextmanager
def _seeded(key: str):
    """Seed the engine's random sources (``random`` and numpy's global generator) from ``key``, restoring them after."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little")
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def _engine_run(sweep: Sweep, params: dict[str, Any], state: str, value: float | None):
    """A trial as the engine sees a W&B run: its config, its state and its final metric."""
    sweeps, _, _ = wandb_sweeps()
    summary = {sweep.metric: value} if value is not None else {}
    config = {name: {"value": value} for name, value in params.items()}
    return sweeps.SweepRun(config=config, state=state, summary_metrics=summary)


def propose(
    sweep: Sweep, done: Sequence[TrialResult] = (), pending: Sequence[dict[str, Any]] = (), seed: int = 0
) -> dict[str, Any] | None:
    """The next trial's values, from W&B's sweep engine (``sweeps.next_run``), as a W&B sweep server proposes them.

    Args:
        sweep: The sweep.
        done: The trials run so far: the engine sees each as a finished run with its final metric (bayes fits its
            Gaussian process to these), or as a failed run when it failed.
        pending: Values proposed but not run yet (a dry run): the engine sees them as pending runs.
        seed: Seed of the engine's random draws; the draw for trial ``k`` depends on ``(seed, k)`` and on what the
            engine is shown, so the same seed and the same results give the same trials.

    Returns:
        Parameter name to value, or None when the sweep is exhausted (a grid whose every point was proposed).
    """
    sweeps, _, _ = wandb_sweeps()
    runs = [
        _engine_run(sweep, r.params, "finished" if r.returncode == 0 else "failed", r.value(sweep.metric)) for r in done
    ]
    runs += [_engine_run(sweep, params, "pending", None) for params in pending]
    with _seeded(f"{seed}/{len(runs)}"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run = sweeps.next_run(dict(sweep.raw), runs)
    if run is None:
        return None
    return {name: _plain(run.config[name]["value"]) for name in sweep.parameters}


def plan(sweep: Sweep, trials: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """The trials proposed before any result is known (what ``--dry-run`` prints): every grid point (or the first
    ``trials``), or ``trials`` draws (default 4); for bayes, later trials of a real run depend on the results."""
    count = trials if trials is not None else (None if sweep.method == "grid" else DEFAULT_RANDOM_TRIALS)
    points: list[dict[str, Any]] = []
    while count is None or len(points) < count:
        point = propose(sweep, pending=points, seed=seed)
        if point is None:
            break
        points.append(point)
    return points


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars and arrays turned into Python values, recursively."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value.tolist() if type(value).__module__ == "numpy" else value
