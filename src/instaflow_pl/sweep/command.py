"""A trial's command: the sweep's command with W&B's macros expanded, as ``wandb agent`` builds it, plus the trial's
folder and metrics file; and the check, by the CLI's own parser, that the command accepts every parameter."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instaflow_pl.errors import UserError
from instaflow_pl.sweep.spec import Sweep

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")
METRICS_FILE = "metrics.json"
"""A trial's final metrics, written by :class:`instaflow_pl.callbacks.FinalMetrics` in its folder."""


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
    callback = {
        "class_path": "instaflow_pl.callbacks.FinalMetrics",
        "init_args": {"path": str(directory / METRICS_FILE)},
    }
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
