"""Sweep files are W&B sweeps whose parameters are real CLI keys; the local runner samples and runs them offline."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO, write_dataset

from instaflow_pl.cli import main
from instaflow_pl.lightning_cli import cli_main
from instaflow_pl.modules import DistillModule, ReflowModule
from instaflow_pl.sweep import local as sweep_module
from instaflow_pl.sweep.command import expand_command, local_command
from instaflow_pl.sweep.engine import plan, propose
from instaflow_pl.sweep.local import run_local
from instaflow_pl.sweep.spec import TrialResult, load_sweep

SWEEPS = sorted((REPO / "configs/sweeps").glob("*.yaml"))
NAMES = [path.name for path in SWEEPS]


def test_the_sweeps_are_here():
    assert NAMES == ["distill_loss_lpips.yaml", "perflow_windows_steps.yaml", "reflow_lr_tdist.yaml"]


@pytest.mark.parametrize("path", SWEEPS, ids=NAMES)
def test_sweep_files_are_wandb_sweeps_whose_command_the_agent_builds_the_same(path):
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    raw = yaml.safe_load(path.read_text())
    assert raw["method"] in ("grid", "random", "bayes") and raw["metric"]["goal"] in ("minimize", "maximize")
    assert raw["program"] == "instaflow-pl" and "${args}" in raw["command"]
    sweep = load_sweep(path)
    params = propose(sweep, seed=0)
    agent_args = create_sweep_command_args({"args": {name: {"value": value} for name, value in params.items()}})
    command = expand_command(sweep, params)
    assert command[: command.index("fit")] == ["instaflow-pl"]
    assert command[command.index("fit") + 3 :] == agent_args["args"], "values formatted as `wandb agent` does"


def parse_trial(sweep_path: Path, params: dict, base_model: Path, data: Path, *extra: str):
    """Parse and instantiate (nothing runs) the command of a trial with these values, on the tiny folders."""
    args = local_command(load_sweep(sweep_path), params)
    assert args[:2] == ["fit", "--config"]
    overrides = [f"--model.init_args.base_model={base_model}", f"--data.init_args.path={data}", *extra]
    return cli_main([*args[1:], *overrides], run=False)


def dotted(config, key: str):
    for part in key.split("."):
        config = config[part]
    return config


@pytest.mark.parametrize("path", SWEEPS, ids=NAMES)
def test_sweep_parameters_are_keys_of_the_command_config(path, tiny_sd, tiny_velocity, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path)
    params = propose(sweep, seed=3) if sweep.method != "grid" else None
    if params is None:  # the grid point with the most options: LPIPS included
        params = max(plan(sweep), key=lambda point: len(str(point)))
    data = write_dataset(tmp_path / "pairs", count=16, shard_size=16)
    reflow = "distill" not in path.name  # reflow and piecewise reflow (PeRFlow)
    extra = [] if reflow else ["--model.init_args.lpips_pretrained=false"]
    if "perflow" in path.name:
        extra.append(f"--model.init_args.teacher={tiny_sd}")
    cli = parse_trial(path, params, tiny_sd if reflow else tiny_velocity, data, *extra)
    assert isinstance(cli.model, ReflowModule if reflow else DistillModule)
    for name, value in params.items():
        expected = yaml.safe_load(value) if isinstance(value, str) else value
        assert dotted(cli.config, name) == expected, name
    if not reflow:
        assert cli.model.distance.lpips is not None, "the LPIPS weight reached the module"

    misspelt = {f"{name}x": value for name, value in params.items()}
    with pytest.raises(SystemExit):
        parse_trial(path, misspelt, tiny_sd, data)


def write_sweep(tmp_path: Path, **changes) -> Path:
    raw = yaml.safe_load((REPO / "configs/sweeps/reflow_lr_tdist.yaml").read_text())
    raw["command"] = [part.replace("configs/", f"{REPO}/configs/") for part in raw["command"]]
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"method": "hyperband"}, "method must be one of grid, random, bayes"),
        ({"metric": None}, "needs a metric"),
        (
            {"parameters": {"model.init_args.t_distribution": {"distribution": "betta"}}},
            "parameter model.init_args.t_distribution is not a W&B parameter specification",
        ),
        ({"parameters": {"trainer.max_steps": {"min": 5, "max": 1}}}, "min 5 is not less than max 1"),
        ({"method": "grid"}, "grid search needs values for model.init_args.optimizer.init_args.lr"),
        ({"command": ["${env}", "${program}", "fit"]}, "add ${args}"),
        ({"parameters": {"model.init_args.t_distrib": {"values": ["uniform"]}}}, "Option 't_distrib' is not accepted"),
        ({"parameters": {"trainer.max_stepz": {"values": [1]}}}, "parameter trainer.max_stepz=1 is not accepted"),
        (
            {"method": "grid", "parameters": {"model.init_args.val_steps": {"values": [[1, 2], "many"]}}},
            "parameter model.init_args.val_steps=many is not accepted",  # every listed value is parsed
        ),
    ],
)
def test_bad_sweep_files_are_one_line_errors(tmp_path, capsys, changes, message):
    path = write_sweep(tmp_path, **changes)
    with pytest.raises(SystemExit) as stop:
        main(["sweep", "--local", str(path), "--dry-run", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("instaflow-pl: error: ") and message in error, error


def fake_trials(objective, calls: list):
    """Stands in for ``run_trial``: the trial's metric is ``objective(values)``, computed here in microseconds."""

    def run_trial(sweep, index, total, params, out, overrides, env):
        calls.append(dict(params))
        metrics = {sweep.metric: objective(params), "global_step": 2.0}
        return TrialResult(index, params, out / f"trial-{index:03d}", [], 0, metrics, 0.0)

    return run_trial


def test_a_grid_sweep_covers_its_grid_exactly(tmp_path, monkeypatch):
    parameters = {
        "a": {"values": [1, 2, 3]},
        "b": {"value": "x"},
        "c": {"distribution": "int_uniform", "min": 0, "max": 1},
        "d": {"parameters": {"l2": {"values": [1.0]}, "lpips": {"values": [0.0, 0.5]}}},
    }
    sweep = load_sweep(write_sweep(tmp_path, method="grid", parameters=parameters))
    monkeypatch.setattr(sweep_module, "check_trial_args", lambda *args: None)
    calls: list[dict] = []
    monkeypatch.setattr(sweep_module, "run_trial", fake_trials(lambda params: 0.0, calls))
    run_local(sweep, out=tmp_path / "out")  # no --trials: the engine says when the grid is done
    grid = itertools.product([1, 2, 3], ["x"], [0, 1], [{"l2": 1.0, "lpips": 0.0}, {"l2": 1.0, "lpips": 0.5}])
    expected = [dict(zip("abcd", point, strict=True)) for point in grid]
    assert len(calls) == len(expected) == 12
    assert sorted(map(repr, calls)) == sorted(map(repr, expected)), "every grid point once, nothing else"
    assert plan(sweep) == calls and plan(sweep, 5) == calls[:5], "the dry run lists the same points"
    distill = plan(load_sweep(REPO / "configs/sweeps/distill_loss_lpips.yaml"))
    assert len({point["model.init_args.distance"] for point in distill}) == len(distill) == 6


def test_a_local_bayes_sweep_proposes_from_the_results(tmp_path, monkeypatch):
    """W&B's bayes engine, fed each finished trial's metric: the same first guesses, then other proposals when the
    results differ, each one toward where its results were best."""
    sweep = load_sweep(REPO / "configs/sweeps/reflow_lr_tdist.yaml")
    assert sweep.method == "bayes"
    monkeypatch.setattr(sweep_module, "check_trial_args", lambda *args: None)
    lr = "model.init_args.optimizer.init_args.lr"

    def sweep_with(best_lr: float, out: str) -> list[float]:
        calls: list[dict] = []
        objective = fake_trials(lambda params: (math.log10(params[lr]) - math.log10(best_lr)) ** 2, calls)
        monkeypatch.setattr(sweep_module, "run_trial", objective)
        run_local(sweep, trials=6, seed=0, out=tmp_path / out)
        return [call[lr] for call in calls]

    low, high = sweep_with(1.2e-4, "low"), sweep_with(2.5e-3, "high")
    blind = [point[lr] for point in plan(sweep, 6, seed=0)]  # proposals that see no result
    assert low[:1] == high[:1] == blind[:1], "nothing seen yet: the same first guess"
    # (with one or two results the engine's Gaussian process is a poor fit and it draws at random, seeded alike)
    assert low[3:] != high[3:] and low[3:] != blind[3:], "after seeing results the proposals differ"
    median = [sorted(rates[3:])[1] for rates in (low, high)]
    assert median[0] < 5.5e-4 < median[1], f"each moves toward its own optimum: {low} vs {high}"
    assert all(1e-4 <= rate <= 3e-3 for rate in low + high)
    assert sweep_with(1.2e-4, "again") == low, "the same seed and results give the same trials"


def test_random_draws_are_reproducible_with_a_seed(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, method="random"))
    draws = plan(sweep, 12, seed=7)
    assert draws == plan(sweep, 12, seed=7) and draws[:3] == plan(sweep, 3, seed=7)
    assert draws != plan(sweep, 12, seed=8)
    rates = [draw["model.init_args.optimizer.init_args.lr"] for draw in draws]
    assert all(1e-4 <= rate <= 3e-3 for rate in rates) and len(set(rates)) == len(rates)
    assert min(rates) < 5.5e-4 < max(rates), "log-uniform: both sides of the geometric mean"
    assert {draw["model.init_args.t_distribution"] for draw in draws} == {"uniform", "logit_normal", "u_shaped"}

    spread = {"x": {"distribution": "q_uniform", "min": 0, "max": 10, "q": 5}, "n": {"min": 1, "max": 3}}
    other = load_sweep(write_sweep(tmp_path, method="random", parameters=spread))
    values = plan(other, 30, seed=0)
    assert {v["x"] for v in values} <= {0, 5, 10} and {v["n"] for v in values} == {1, 2, 3}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, id=p.name, marks=[] if p.name.startswith("reflow") else [pytest.mark.slow]) for p in SWEEPS],
)  # one trial in make test (its budget), every sweep's in make test-all
def test_one_local_trial_runs_and_is_summarized(path, tiny_sd, tiny_velocity, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path)
    reflow = "distill" not in path.name  # reflow and piecewise reflow (PeRFlow)
    overrides = [
        f"--model.init_args.base_model={tiny_sd if reflow else tiny_velocity}",
        *([f"--model.init_args.teacher={tiny_sd}"] if "perflow" in path.name else []),
        f"--data.init_args.path={write_dataset(tmp_path / 'pairs', count=32, shard_size=16)}",
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.enable_progress_bar=false",
    ]
    if not reflow:  # an LPIPS grid point from the file; W&B is off here (test_wandb covers it)
        distances = sweep.parameters["model.init_args.distance"]["values"]
        sweep.parameters = {"model.init_args.distance": {"values": [d for d in distances if "lpips" in d][:1]}}
        overrides += ["--model.init_args.lpips_pretrained=false", "--trainer.logger=false"]
    out = tmp_path / "sweep"
    results = run_local(sweep, trials=1, seed=0, out=out, overrides=overrides)

    assert [r.returncode for r in results] == [0], (out / "trial-001/log.txt").read_text()[-3000:]
    value = results[0].value(sweep.metric)
    assert value is not None and results[0].metrics["global_step"] == 2
    table = (out / "summary.md").read_text()
    assert sweep.metric in table and f"{value:.6g}" in table and f"{value:.6g}" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == {"name": sweep.metric, "goal": "minimize"}
    assert summary["trials"][0]["params"] == results[0].params and summary["trials"][0]["value"] == value
    trial = out / "trial-001"
    assert (trial / "config.yaml").is_file() and list(trial.rglob("*.ckpt"))
    assert bool(list(trial.glob("wandb/offline-run-*/run-*.wandb"))) == reflow, "the W&B run stays in the trial"


def test_make_sweep_runs_locally_unless_wandb_is_online():
    def dry(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
        command = ["make", "--no-print-directory", "-n", "sweep", *args]  # also right when run under `make test`
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.strip().splitlines() if not line.startswith("make")][-1]

    assert "instaflow-pl sweep --local" in dry("WANDB_MODE=offline")
    online = dry("WANDB_MODE=online", "SWEEP=configs/sweeps/distill_loss_lpips.yaml", "TRIALS=3")
    assert "--local" not in online and "distill_loss_lpips.yaml" in online and "--trials 3" in online
