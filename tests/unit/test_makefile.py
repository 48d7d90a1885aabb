"""The Makefile's targets run what they say (``make -n``: nothing is executed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from instaflow_pl.demo.plan import STAGES

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_every_demo_stage_target_runs_its_stage():
    # .PHONY targets skip implicit rules, so a `demo-%:` pattern rule listed there printed "Nothing to be done".
    targets = [f"demo-{name}" for name in STAGES]
    out = subprocess.run(["make", "-n", "-C", str(ROOT), *targets], capture_output=True, text=True, check=True).stdout
    for name in STAGES:
        assert f"instaflow-pl demo --stage {name}" in out, f"make demo-{name} does not run the stage:\n{out}"
    assert "Nothing to be done" not in out
