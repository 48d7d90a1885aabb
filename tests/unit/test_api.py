"""The package's top level: the public API by name, imported lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import instaflow_pl


@pytest.mark.parametrize("name", instaflow_pl.__all__)
def test_every_public_name_is_its_modules_object(name):
    assert sorted(instaflow_pl.__all__) == sorted(instaflow_pl._EXPORTS)
    value = getattr(instaflow_pl, name)
    assert value is getattr(importlib.import_module(instaflow_pl._EXPORTS[name]), name)
    assert name in dir(instaflow_pl)


def test_the_issue_s_names_import_from_the_top_level():
    from instaflow_pl import DistillModule, InstaFlowPipeline, LatentODE, ReflowModule, TriplesDataModule

    assert DistillModule.__name__ == "DistillModule" and ReflowModule.__module__ == "instaflow_pl.modules.reflow"
    assert LatentODE.__module__ == "instaflow_pl.solver.ode" and InstaFlowPipeline.__module__ == "instaflow_pl.pipeline"
    assert TriplesDataModule.__name__ == "TriplesDataModule"
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        instaflow_pl.NoSuchThing  # noqa: B018


def test_import_instaflow_pl_loads_no_heavy_library():
    code = "import sys, instaflow_pl; print(sorted(m for m in ('torch', 'lightning', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
