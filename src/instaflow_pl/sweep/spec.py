"""A sweep file, read and checked against W&B's own schema, and the result of one of its trials."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from instaflow_pl.errors import UserError

METHODS = ("grid", "random", "bayes")
GOALS = ("minimize", "maximize")
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
"""W&B's command when a sweep file gives none."""
ARGS_MACROS = ("${args}", "${args_no_hyphens}", "${args_no_equals}", "${args_json}", "${args_no_boolean_flags}")


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


def wandb_sweeps():
    """W&B's sweep engine (the ``sweeps`` package), imported without the pydantic notice it prints on import.

    Returns:
        The ``sweeps`` module, and its ``HyperParameter`` and ``HyperParameterSet`` classes.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps
        from sweeps.params import HyperParameter, HyperParameterSet
    return sweeps, HyperParameter, HyperParameterSet


def _check_parameters(path: Path, method: str, parameters: dict[str, Any]) -> None:
    """Each parameter against W&B's own schema; for a grid, W&B's rule that every parameter is discrete."""
    sweeps, hyper_parameter, parameter_set = wandb_sweeps()
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
