"""Every YAML in configs/ runs: tiny ones for real, sd15 ones parsed and instantiated on the tiny folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import REPO

from instaflow_pl.cli import cli_main
from instaflow_pl.modules import PairGenerator

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_every_config_is_covered_here():
    covered = {"tiny/pairs.yaml", "sd15/pairs.yaml"}
    assert {str(p.relative_to(REPO / "configs")) for p in CONFIGS} == covered, "add new configs to these tests"


def test_tiny_pairs_config_runs_as_written(tiny_sd, tmp_path):
    config = yaml.safe_load((REPO / "configs/tiny/pairs.yaml").read_text())
    prompts = REPO / config["data"]["init_args"]["prompts"]
    out = tmp_path / "pairs"
    cli_main(
        [
            "predict",
            "--config",
            str(REPO / "configs/tiny/pairs.yaml"),
            f"--model.init_args.teacher={tiny_sd}",
            f"--model.init_args.output_dir={out}",
            f"--data.init_args.prompts={prompts}",
        ]
    )
    assert (out / "index.json").is_file()


def test_sd15_pairs_config_instantiates_on_the_tiny_folder(tiny_sd, tmp_path):
    cli = cli_main(
        [
            "--config",
            str(REPO / "configs/sd15/pairs.yaml"),
            f"--model.init_args.teacher={tiny_sd}",
            f"--model.init_args.output_dir={tmp_path / 'out'}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
        ],
        run=False,
    )
    model = cli.model
    assert isinstance(model, PairGenerator)
    assert (model.steps, model.guidance, model.latent_shape) == (25, 6.0, (4, 64, 64))
    assert model.teacher.solver_name == "dpm++" and model.teacher.model.unet.dtype.itemsize == 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(Path(p).relative_to(REPO)))
def test_config_is_valid_yaml_with_class_paths(path):
    config = yaml.safe_load(path.read_text())
    assert config["model"]["class_path"].startswith("instaflow_pl.")
