"""Proof that a family is one file plus its fixture: this module defines a new family (Stable Diffusion under other
names: its own pipeline class, network class and tiny builder), registers it, and the generic family suite passes
on it with no other file changed."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from diffusers import ModelMixin, UNet2DConditionModel  # noqa: F401 - diffusers finds loaders by this name here
from suite import CHECKS, run_family

from instaflow_pl.families import FAMILIES, family_of_network, register, unregister
from instaflow_pl.families.sd import StableDiffusion
from instaflow_pl.model_folder import ModelFolder


class CopyUNet(UNet2DConditionModel):
    """SD's UNet under another class name: the network of the test's family."""


class StableDiffusionCopy(StableDiffusion):
    """A family defined outside the package: SD 1.x, renamed."""

    name = "sdcopy"
    title = "Stable Diffusion copy"
    pipeline_classes = ("StableDiffusionCopyPipeline",)
    network_classes = ((__name__, "CopyUNet"),)
    fixture = __name__

    def owns_network_config(self, config: Mapping[str, Any]) -> bool:
        """A ``CopyUNet``."""
        return config.get("_class_name") == "CopyUNet"


def build_tiny(out_dir: str | Path, seed: int = 0, sample_size: int = 8) -> Path:
    """The family's tiny builder: SD's tiny folder with the copy's pipeline and network class names."""
    out = FAMILIES["sd"].build_tiny(out_dir, seed=seed, sample_size=sample_size)
    config = json.loads((out / "unet" / "config.json").read_text())
    (out / "unet" / "config.json").write_text(json.dumps({**config, "_class_name": "CopyUNet"}))
    index = json.loads((out / "model_index.json").read_text())
    index.update(_class_name="StableDiffusionCopyPipeline", unet=[__name__, "CopyUNet"])
    (out / "model_index.json").write_text(json.dumps(index))
    return out


@pytest.fixture
def copy_family():
    family = register(StableDiffusionCopy())
    yield family
    unregister(family.name)


def test_a_family_defined_in_a_test_passes_the_generic_suite(copy_family, tmp_path):
    run = run_family(copy_family.name, tmp_path / "run")
    for name, check in CHECKS.items():
        if name != "stock_pipeline":  # stock diffusers has no StableDiffusionCopyPipeline
            check(run, tmp_path / name)
    assert ModelFolder.open(run.base).family is copy_family
    assert (
        type(run.module.velocity.network) is CopyUNet and family_of_network(run.module.velocity.network) is copy_family
    )
