"""Hyperparameter sweeps in W&B's sweep format, run by a W&B server or here, offline, trial by trial.

A sweep file (``configs/sweeps/*.yaml``) is a W&B sweep configuration: ``method`` (``grid``, ``random``, ``bayes``),
``metric`` (``name`` and ``goal``), ``parameters`` named by their LightningCLI keys
(``model.init_args.optimizer.init_args.lr``) and a ``command`` with W&B's macros, e.g.
``[${env}, ${program}, fit, --config, configs/tiny/reflow.yaml, ${args}]`` with ``program: instaflow-pl``.

- With a W&B server (``WANDB_MODE=online``, logged in): ``instaflow-pl sweep FILE`` creates the sweep and runs an
  agent on it (what ``wandb sweep FILE`` and ``wandb agent ID`` do).
- Without one: ``instaflow-pl sweep --local FILE --trials N`` asks W&B's own sweep engine (the ``sweeps`` package
  the W&B server runs: grid, random and bayes with W&B's semantics) for each trial's values, feeding it the finished
  trials' metrics as the server would, runs each trial as its own ``instaflow-pl fit`` process in ``OUT/trial-NNN``
  (the values as command-line overrides, exactly as the W&B agent passes them) and prints a table sorted by the
  sweep's metric (also ``OUT/summary.md`` and ``summary.json``).

Before anything runs, the trial command is parsed with the first proposed values, so a parameter that is not a key
of the command's config is one clear error, not a sweep of failed runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from instaflow_pl.errors import UserError

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
"""W&B's command when a sweep file gives none."""
ARGS_MACROS = ("${args}", "${args_no_hyphens}", "${args_no_equals}", "${args_json}", "${args_no_boolean_flags}")
DEFAULT_RANDOM_TRIALS = 4
LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
METRICS_FILE = "metrics.json"


@dataclass
class Sweep:
    """A sweep file, checked.

    Attributes:
        path: The YAML file.
        method: ``grid``, ``random`` or ``bayes``.
        metric: The metric's name, e.g. ``val/mse@1``.
        goal: ``minimize`` or ``maximize``.
        parameters: Parameter name (a CLI key) to its W&B specification (``values``, ``distribution`` ...).
        command: The command with W&B's macros.
        program: The ``program`` entry (what ``${program}`` stands for), if any.
        project: The W&B project of the sweep, if given.
        raw: The whole file, as W&B receives it.
    """

    path: Path
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    command: list[str]
    program: str | None = None
    project: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass
class TrialResult:
    """One finished trial.

    Attributes:
        index: 1-based trial number.
        params: The sampled parameter values.
        directory: The trial's ``trainer.default_root_dir``.
        command: The command that ran.
        returncode: The process's exit status.
        metrics: The trial's final logged metrics (``trainer.callback_metrics``), with ``global_step``.
        seconds: Wall time of the trial.
    """

    index: int
    params: dict[str, Any]
    directory: Path
    command: list[str]
    returncode: int
    metrics: dict[str, float]
    seconds: float

    def value(self, metric: str) -> float | None:
        """The trial's final value of ``metric``, or None when it did not log it."""
        value = self.metrics.get(metric)
        return None if value is None or math.isnan(value) else value

    @property
    def status(self) -> str:
        """``ok``, or why the trial has no result."""
        return "ok" if self.returncode == 0 else f"failed (exit {self.returncode})"


# ---- the sweep file ------------------------------------------------------------------------------------------------


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep file.

    Raises:
        UserError: the file is missing or is not a usable W&B sweep configuration (unknown method, no metric, a
            parameter without values or with an unsupported distribution, a command without ``${args}``).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sweep file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: a sweep file is a mapping with method, metric, parameters and command")
    method = raw.get("method")
    if method not in METHODS:
        raise UserError(f"{path}: method must be one of {', '.join(METHODS)}, got {method!r}")
    metric = raw.get("metric")
    if not isinstance(metric, dict) or not isinstance(metric.get("name"), str) or not metric["name"]:
        raise UserError(f"{path}: the sweep needs a metric, e.g. metric: {{name: val/mse@1, goal: minimize}}")
    goal = metric.get("goal", "minimize")
    if goal not in GOALS:
        raise UserError(f"{path}: metric.goal must be minimize or maximize, got {goal!r}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise UserError(f"{path}: the sweep needs parameters, e.g. model.init_args.optimizer.init_args.lr: {{...}}")
    _check_parameters(path, method, parameters)
    command = raw.get("command", DEFAULT_COMMAND)
    if not isinstance(command, list) or not all(isinstance(part, str | int | float) for part in command):
        raise UserError(f"{path}: command must be a list of strings, e.g. [${{env}}, ${{program}}, fit, ${{args}}]")
    command = [str(part) for part in command]
    if not any(part in ARGS_MACROS for part in command):
        raise UserError(f"{path}: the command never receives the parameters: add ${{args}} to it")
    program = raw.get("program")
    if "${program}" in command and not program:
        raise UserError(f"{path}: the command uses ${{program}} but the sweep sets no program")
    return Sweep(path, method, metric["name"], goal, dict(parameters), command, program, raw.get("project"), raw)


def _engine():
    """W&B's sweep engine (the ``sweeps`` package), imported without the pydantic notice it prints on import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
        from sweeps.params import HyperParameter, HyperParameterSet
    return sweeps, HyperParameter, HyperParameterSet


def _check_parameters(path: Path, method: str, parameters: dict[str, Any]) -> None:
    """Each parameter against W&B's own schema; for a grid, W&B's rule that every parameter is discrete."""
    sweeps, hyper_parameter, parameter_set = _engine()
    for name, spec in parameters.items():
        if not isinstance(spec, dict):
            raise UserError(f"{path}: parameter {name} must be a mapping such as {{values: [...]}}, got {spec!r}")
        try:
            violations = sweeps.schema_violations_from_proposed_config({"method": method, "parameters": {name: spec}})
        except (ValueError, TypeError, AssertionError) as err:
            violations = [str(err)]
        if violations:
            reasons = "; ".join(dict.fromkeys(" ".join(v.split()) for v in violations))
            raise UserError(f"{path}: parameter {name} is not a W&B parameter specification: {reasons}")
    if method == "grid":
        discrete = (hyper_parameter.CATEGORICAL, hyper_parameter.CONSTANT, hyper_parameter.INT_UNIFORM)
        for parameter in parameter_set.from_config(parameters):
            if parameter.type not in (*discrete, hyper_parameter.Q_UNIFORM):
                name = parameter.name.replace(parameter_set.NESTING_DELIMITER, ".")
                raise UserError(
                    f"{path}: grid search needs values for {name} (its {parameter.type} distribution is continuous)"
                )


# ---- proposals: W&B's engine -----------------------------------------------------------------------------------------


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
    sweeps, _, _ = _engine()
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
    sweeps, _, _ = _engine()
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


# ---- commands --------------------------------------------------------------------------------------------------------


def expand_command(sweep: Sweep, params: dict[str, Any]) -> list[str]:
    """The command with W&B's macros replaced, as ``wandb agent`` does (values formatted with ``str``).

    ``${env}`` is dropped (the agent's ``/usr/bin/env``), ``${interpreter}`` is this Python.
    """
    flags = [f"{name}={value}" for name, value in params.items()]
    macros = {
        "env": [],
        "interpreter": [sys.executable],
        "program": [str(sweep.program)] if sweep.program else [],
        "args": [f"--{flag}" for flag in flags],
        "args_no_hyphens": flags,
        "args_no_equals": [part for name, value in params.items() for part in (f"--{name}", str(value))],
        "args_json": [json.dumps(params)],
        "args_no_boolean_flags": [
            f"--{name}" if value is True else f"--{name}={value}"
            for name, value in params.items()
            if value is not False
        ],
    }
    command = []
    for part in sweep.command:
        if part.startswith("${") and part.endswith("}"):
            if part[2:-1] not in macros:
                raise UserError(f"{sweep.path}: the command macro {part} is not supported by the local runner")
            command += macros[part[2:-1]]
        else:
            command.append(re.sub(r"\$\{envvar:([A-Za-z0-9_]*)\}", lambda m: os.environ.get(m[1], m[1]), part))
    return command


def local_command(sweep: Sweep, params: dict[str, Any]) -> list[str]:
    """The trial's ``instaflow-pl`` command, run with this Python (``instaflow-pl SUBCOMMAND ...`` arguments).

    Raises:
        UserError: the command is not an ``instaflow-pl fit|validate|test`` command.
    """
    command = expand_command(sweep, params)
    if command and Path(command[0]).name == "instaflow-pl":
        args = command[1:]
    elif command[:3] == [sys.executable, "-m", "instaflow_pl.cli"]:
        args = command[3:]
    else:
        args = []
    if not args or args[0] not in LIGHTNING_SUBCOMMANDS:
        raise UserError(
            f"{sweep.path}: the local runner runs `instaflow-pl fit|validate|test ...` commands, not {command[:3]}"
        )
    return args


def trial_args(base: list[str], directory: Path, overrides: Sequence[str]) -> list[str]:
    """A trial's arguments: the sweep's, the overrides for every trial, then its own folder and metrics file."""
    callback = {"class_path": "instaflow_pl.sweep.FinalMetrics", "init_args": {"path": str(directory / METRICS_FILE)}}
    return [
        *base,
        *overrides,
        f"--trainer.default_root_dir={directory}",
        f"--trainer.callbacks+={json.dumps(callback)}",
    ]


def check_trial_args(sweep: Sweep, point: dict[str, Any], overrides: Sequence[str], directory: Path) -> None:
    """Parse trial command lines with the LightningCLI parser (nothing is instantiated or run).

    The command of the trial with the values ``point`` is parsed whole (every parameter name is a key of the command's
    config, the overrides are valid), then each other value that a parameter lists (``values``), since a value such
    as ``{l2: 1.0, lpips: 0.5}`` must fit its option's type too.

    Raises:
        UserError: naming the sweep parameter (or override) that the command does not accept.
    """
    base = local_command(sweep, {})
    command = " ".join(["instaflow-pl", *base])

    def check_one(name: str, value: Any) -> None:
        error = _parse_error(trial_args(local_command(sweep, {name: value}), directory, overrides))
        if error is not None:
            raise UserError(f"{sweep.path}: parameter {name}={value} is not accepted by `{command}`: {error}")

    error = _parse_error(trial_args(local_command(sweep, point), directory, overrides))
    if error is not None:
        if _parse_error(trial_args(base, directory, overrides)) is not None:
            raise UserError(f"{sweep.path}: the trial command does not parse even without sweep parameters: {error}")
        for name, value in point.items():
            check_one(name, value)
        raise UserError(f"{sweep.path}: the trial command does not parse: {error}")
    for name, spec in sweep.parameters.items():
        if isinstance(spec.get("values"), list):
            for value in spec["values"]:
                if repr(value) != repr(point[name]):
                    check_one(name, value)


def _parse_error(args: list[str]) -> str | None:
    """None when ``args`` parse; else the parser's error, on one line."""
    from instaflow_pl.lightning_cli import cli_main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_main([*args, "--print_config"])
    except SystemExit as stop:
        if not stop.code:
            return None
    except UserError as user_error:
        return str(user_error)
    text = err.getvalue().split("error:", 1)[-1]
    lines = [line.strip(" -") for line in text.splitlines() if line.strip()]
    for pattern in (r"Option '[^']+' is not accepted", r"unrecognized arguments: .*", r"No action for key .*"):
        for line in lines:
            if found := re.search(pattern, line):
                return found[0]
    return " ".join(lines)[:300] or "the command's parser rejected it"


# ---- running ---------------------------------------------------------------------------------------------------------


class FinalMetrics(Callback):
    """Writes the run's latest logged metrics (``trainer.callback_metrics``) to a JSON file after each validation and
    at the end of fit or test, so a sweep runner reads each trial's result without a logger.

    Args:
        path: The JSON file to write.
    """

    def __init__(self, path: str):
        self.path = Path(path)

    def _write(self, trainer) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            try:
                metrics[name] = float(value)
            except (TypeError, ValueError, RuntimeError):
                continue
        metrics["global_step"] = float(trainer.global_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, indent=1, sort_keys=True))
        tmp.replace(self.path)

    def on_validation_end(self, trainer, pl_module) -> None:
        """After each validation."""
        self._write(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        """At the end of fit."""
        self._write(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        """At the end of test."""
        self._write(trainer)


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
    shown = ", ".join(f"{_short(name, sweep)}={value}" for name, value in params.items())
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


def ranked(sweep: Sweep, results: Sequence[TrialResult]) -> list[TrialResult]:
    """Trials best first by the sweep's metric; failed trials and trials without the metric last, in trial order."""
    sign = 1.0 if sweep.goal == "minimize" else -1.0

    def key(result: TrialResult) -> tuple[bool, float]:
        value = result.value(sweep.metric)
        return (result.returncode != 0 or value is None, sign * value if value is not None else 0.0)

    return sorted(results, key=key)


def write_summary(sweep: Sweep, results: Sequence[TrialResult], out: Path, seed: int, notes: Sequence[str] = ()) -> str:
    """Write ``summary.md`` (a table sorted by the metric) and ``summary.json``; returns the table."""
    order = ranked(sweep, results)
    names = list(sweep.parameters)
    header = ["rank", "trial", *(_short(name, sweep) for name in names), sweep.metric, "steps", "status", "seconds"]
    rows = []
    for rank, result in enumerate(order, 1):
        value = result.value(sweep.metric)
        rows.append(
            [
                str(rank),
                f"{result.index:03d}",
                *(str(result.params.get(name)) for name in names),
                f"{value:.6g}" if value is not None else "-",
                str(int(result.metrics.get("global_step", 0))),
                result.status,
                f"{result.seconds:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |"
        for row in [header, ["-" * w for w in widths], *rows]
    ]
    table = "\n".join(lines)
    title = f"# Sweep {sweep.path.name} ({sweep.method}, {sweep.goal} {sweep.metric})\n\n"
    extra = "".join(f"- {note}\n" for note in notes)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(title + (extra + "\n" if extra else "") + table + "\n")
    summary = {
        "sweep": str(sweep.path),
        "method": sweep.method,
        "metric": {"name": sweep.metric, "goal": sweep.goal},
        "seed": seed,
        "notes": list(notes),
        "trials": [
            {
                "rank": rank,
                "trial": result.index,
                "params": result.params,
                "value": result.value(sweep.metric),
                "metrics": result.metrics,
                "status": result.status,
                "seconds": round(result.seconds, 2),
                "directory": str(result.directory),
                "command": result.command,
            }
            for rank, result in enumerate(order, 1)
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return table


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


# ---- the command -----------------------------------------------------------------------------------------------------


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


def _short(name: str, sweep: Sweep) -> str:
    """A parameter's last key (``lr``) when no other parameter ends the same way."""
    last = name.rsplit(".", 1)[-1]
    return last if sum(n.rsplit(".", 1)[-1] == last for n in sweep.parameters) == 1 else name


def _quote(part: str) -> str:
    return part if re.fullmatch(r"[\w@%+=:,./-]+", part) else "'" + part.replace("'", "'\\''") + "'"


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1].strip()[:200] if lines else "no output"
