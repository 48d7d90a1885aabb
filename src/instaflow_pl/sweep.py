"""Hyperparameter sweeps in W&B's sweep format, run by a W&B server or here, offline, trial by trial.

A sweep file (``configs/sweeps/*.yaml``) is a W&B sweep configuration: ``method`` (``grid``, ``random``, ``bayes``),
``metric`` (``name`` and ``goal``), ``parameters`` named by their LightningCLI keys
(``model.init_args.optimizer.init_args.lr``) and a ``command`` with W&B's macros, e.g.
``[${env}, ${program}, fit, --config, configs/tiny/reflow.yaml, ${args}]`` with ``program: instaflow-pl``.

- With a W&B server (``WANDB_MODE=online``, logged in): ``instaflow-pl sweep FILE`` creates the sweep and runs an
  agent on it (what ``wandb sweep FILE`` and ``wandb agent ID`` do).
- Without one: ``instaflow-pl sweep --local FILE --trials N`` samples the same parameters here (grid: every point in
  order; random: seeded draws from the same distributions; bayes: random draws, with a note), runs each trial as its
  own ``instaflow-pl fit`` process in ``OUT/trial-NNN`` (the values as command-line overrides, exactly as the W&B
  agent passes them) and prints a table sorted by the sweep's metric (also ``OUT/summary.md`` and ``summary.json``).

Before anything runs, the trial command is parsed with the sampled values, so a parameter that is not a key of the
command's config is one clear error, not a sweep of failed runs.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch.callbacks import Callback

from instaflow_pl.errors import UserError

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
DISTRIBUTIONS = (
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform_values",
    "normal",
    "log_normal",
)
"""The W&B parameter distributions the local runner samples."""
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
    for name, spec in parameters.items():
        _check_spec(path, str(name), spec)
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


def _distribution(spec: dict[str, Any]) -> str:
    """The spec's distribution, inferred as W&B does when it is not given."""
    if "parameters" in spec:
        return "nested"
    if "distribution" in spec:
        return spec["distribution"]
    if "values" in spec:
        return "categorical"
    if "value" in spec:
        return "constant"
    if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
        return "int_uniform"
    return "uniform"


def _check_spec(path: Path, name: str, spec: Any) -> None:
    if not isinstance(spec, dict):
        raise UserError(f"{path}: parameter {name} must be a mapping such as {{values: [...]}}, got {spec!r}")
    dist = _distribution(spec)
    if dist == "nested":
        if not isinstance(spec["parameters"], dict) or not spec["parameters"]:
            raise UserError(f"{path}: parameter {name}: parameters must be a non-empty mapping")
        for key, sub in spec["parameters"].items():
            _check_spec(path, f"{name}.{key}", sub)
        return
    if dist not in DISTRIBUTIONS:
        raise UserError(
            f"{path}: parameter {name}: distribution {dist!r} is not supported here (use {', '.join(DISTRIBUTIONS)})"
        )
    if dist == "categorical":
        if not isinstance(spec.get("values"), list) or not spec["values"]:
            raise UserError(f"{path}: parameter {name}: values must be a non-empty list")
        probabilities = spec.get("probabilities")
        if probabilities is not None and (
            not isinstance(probabilities, list) or len(probabilities) != len(spec["values"])
        ):
            raise UserError(f"{path}: parameter {name}: probabilities must give one weight per value")
    elif dist == "constant":
        if "value" not in spec:
            raise UserError(f"{path}: parameter {name}: a constant needs value")
    elif dist in ("normal", "log_normal"):
        if not isinstance(spec.get("mu", 0.0), int | float) or not isinstance(spec.get("sigma", 1.0), int | float):
            raise UserError(f"{path}: parameter {name}: mu and sigma must be numbers")
    else:
        low, high = spec.get("min"), spec.get("max")
        if not isinstance(low, int | float) or not isinstance(high, int | float) or low > high:
            raise UserError(f"{path}: parameter {name}: {dist} needs numbers min <= max, got min={low!r} max={high!r}")
        if dist in ("log_uniform_values", "q_log_uniform_values") and low <= 0:
            raise UserError(f"{path}: parameter {name}: {dist} needs min > 0")
        if dist.startswith("q_") and not (isinstance(spec.get("q", 1), int | float) and spec.get("q", 1) > 0):
            raise UserError(f"{path}: parameter {name}: q must be a number > 0")


# ---- sampling --------------------------------------------------------------------------------------------------------


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    """Every point of a grid sweep, in W&B's order (the last parameter varies fastest).

    Raises:
        UserError: a parameter has a continuous distribution (a grid needs values).
    """
    names = list(sweep.parameters)
    axes = [_grid_values(sweep.path, name, sweep.parameters[name]) for name in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*axes)]


def _grid_values(path: Path, name: str, spec: dict[str, Any]) -> list[Any]:
    dist = _distribution(spec)
    if dist == "nested":
        keys = list(spec["parameters"])
        axes = [_grid_values(path, f"{name}.{key}", spec["parameters"][key]) for key in keys]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]
    if dist == "categorical":
        return list(spec["values"])
    if dist == "constant":
        return [spec["value"]]
    if dist == "int_uniform":
        return list(range(int(spec["min"]), int(spec["max"]) + 1))
    raise UserError(f"{path}: grid search needs values for {name} (its {dist} distribution is continuous)")


def sample_point(sweep: Sweep, seed: int, index: int) -> dict[str, Any]:
    """Random draw ``index`` of every parameter (floats rounded to 4 significant digits).

    Each parameter of each draw has a random stream of its own, seeded by ``(seed, index, name)``: draws do not
    depend on how many are taken, and adding a parameter leaves the others' values as they were.
    """
    return {name: _sample(spec, seed, index, name) for name, spec in sweep.parameters.items()}


def _sample(spec: dict[str, Any], seed: int, index: int, name: str) -> Any:
    dist = _distribution(spec)
    if dist == "nested":
        return {key: _sample(sub, seed, index, f"{name}.{key}") for key, sub in spec["parameters"].items()}
    rng = random.Random(f"{seed}/{index}/{name}")
    if dist == "constant":
        return spec["value"]
    if dist == "categorical":
        weights = spec.get("probabilities")
        return rng.choices(spec["values"], weights=weights)[0] if weights else rng.choice(spec["values"])
    if dist == "int_uniform":
        return rng.randint(int(spec["min"]), int(spec["max"]))
    low, high, q = spec.get("min"), spec.get("max"), spec.get("q", 1)
    if dist == "uniform":
        value = rng.uniform(low, high)
    elif dist == "q_uniform":
        value = round(rng.uniform(low, high) / q) * q
    elif dist == "log_uniform":  # W&B: min and max are natural logarithms
        value = math.exp(rng.uniform(low, high))
    elif dist == "log_uniform_values":
        value = math.exp(rng.uniform(math.log(low), math.log(high)))
    elif dist == "q_log_uniform_values":
        value = round(math.exp(rng.uniform(math.log(low), math.log(high))) / q) * q
    elif dist == "normal":
        value = rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))
    else:  # log_normal
        value = math.exp(rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0)))
    return float(f"{value:.4g}")


def sample_trials(sweep: Sweep, trials: int | None = None, seed: int = 0) -> tuple[list[dict[str, Any]], list[str]]:
    """The parameter values of each trial, and notes on how they were chosen.

    Args:
        sweep: The sweep.
        trials: How many trials; None: every grid point, or 4 random draws.
        seed: Seed of the random draws (the same seed gives the same trials, and N trials are the first N of more).

    Returns:
        One dict of parameter values per trial, and notes for the user.
    """
    notes: list[str] = []
    if trials is not None and trials < 1:
        raise UserError(f"--trials must be at least 1, got {trials}")
    if sweep.method == "grid":
        points = grid_points(sweep)
        if trials is not None and trials < len(points):
            notes.append(f"running the first {trials} of the {len(points)} grid points")
            points = points[:trials]
        elif trials is not None and trials > len(points):
            notes.append(f"the grid has only {len(points)} points")
        return points, notes
    if sweep.method == "bayes":
        notes.append("bayes search needs the W&B sweep controller: sampling the same distributions at random here")
    if trials is None:
        trials = DEFAULT_RANDOM_TRIALS
        notes.append(f"{sweep.method} search: {trials} trials (--trials N for more)")
    return [sample_point(sweep, seed, index) for index in range(trials)], notes


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
        if _distribution(spec) == "categorical":
            for value in spec["values"]:
                if repr(value) != repr(point[name]):
                    check_one(name, value)


def _parse_error(args: list[str]) -> str | None:
    """None when ``args`` parse; else the parser's error, on one line."""
    from instaflow_pl.cli import cli_main

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
    """Run a sweep here: each trial is a fresh ``instaflow-pl`` process in ``out/trial-NNN``.

    Args:
        sweep: The sweep.
        trials: How many trials (None: every grid point, or 4 random draws).
        seed: Seed of the random draws.
        out: Folder of the trials and the summary (default ``outputs/sweeps/<name>-<time>``).
        overrides: Command-line overrides for every trial (e.g. ``--trainer.max_steps=2``).
        dry_run: Print the trial commands and stop.

    Returns:
        The trials' results, in trial order.

    Raises:
        UserError: a bad sweep file, a parameter the command does not accept, an output folder that already holds a
            sweep, or every trial failed.
    """
    points, notes = sample_trials(sweep, trials, seed)
    if out is None:
        out = Path("outputs/sweeps") / f"{sweep.path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    if out.exists() and any(out.glob("trial-*")):
        raise UserError(f"{out} already holds a sweep's trials; choose another --out")
    for note in notes:
        print(f"note: {note}")
    check_trial_args(sweep, points[0], overrides, out / "trial-001")
    if dry_run:
        for i, params in enumerate(points, 1):
            args = trial_args(local_command(sweep, params), out / f"trial-{i:03d}", overrides)
            print(" ".join(_quote(part) for part in ["instaflow-pl", *args]))
        return []
    env = {**os.environ}
    env.setdefault("WANDB_MODE", "offline")  # a local sweep needs no server; `wandb sync` uploads the runs later
    env.setdefault("WANDB_RUN_GROUP", out.name)
    results: list[TrialResult] = []
    interrupted = False
    try:
        _run_trials(sweep, points, out, overrides, env, results)
    except KeyboardInterrupt:  # Ctrl-C: summarise the finished trials, then stop
        if not results:
            raise
        interrupted = True
        notes = [*notes, f"interrupted after {len(results)} of {len(points)} trials"]
    table = write_summary(sweep, results, out, seed, notes)
    print(table)
    print(f"summary: {out / 'summary.md'}, {out / 'summary.json'}")
    if interrupted:
        raise SystemExit(130)
    if all(result.returncode != 0 for result in results):
        raise UserError(f"every trial failed; see {results[0].directory / 'log.txt'}")
    return results


def _run_trials(
    sweep: Sweep,
    points: list[dict[str, Any]],
    out: Path,
    overrides: Sequence[str],
    env: dict[str, str],
    results: list[TrialResult],
) -> None:
    """Run the trials one after the other, appending each result to ``results`` as it finishes."""
    prefix = [sys.executable, "-m", "instaflow_pl.cli"]
    for i, params in enumerate(points, 1):
        directory = out / f"trial-{i:03d}"
        directory.mkdir(parents=True)
        command = [*prefix, *trial_args(local_command(sweep, params), directory, overrides)]
        shown = ", ".join(f"{_short(name, sweep)}={value}" for name, value in params.items())
        print(f"trial {i}/{len(points)}: {shown}", flush=True)
        start = time.monotonic()
        with (directory / "log.txt").open("w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        metrics_file = directory / METRICS_FILE
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        result = TrialResult(i, params, directory, command, code, metrics, time.monotonic() - start)
        results.append(result)
        value = result.value(sweep.metric)
        outcome = f"{sweep.metric}={value:.6g}" if value is not None else f"no {sweep.metric}"
        if code != 0:
            last = _last_line(directory / "log.txt")
            outcome = f"{result.status}: {last} (log: {directory / 'log.txt'})"
        print(f"  -> {outcome} ({result.seconds:.1f} s)", flush=True)


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
    check_trial_args(sweep, sample_trials(sweep, 1)[0][0], (), Path("outputs/sweeps/check"))
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
    parser.add_argument("--seed", type=int, default=0, help="seed of random draws (default: %(default)s)")
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
