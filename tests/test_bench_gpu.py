"""bench/gpu.py runs every part at tiny shapes on the CPU (``--tiny``): the script a GPU runs is known to work."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_benchmark_runs_at_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    names = [row["benchmark"] for row in report["rows"]]
    for part in ("pairs", "compile", "reflow fp32, batch 2", "distill-l2 fp32, batch 4", "distill-lpips", "latency batch 1"):
        assert any(part in name for name in names), part
    pairs = report["rows"][0]
    error = float(pairs["benchmark"].split("rel. err ")[1].rstrip(")"))
    assert error < 1e-4, "the teacher and diffusers' pipeline solve the same ODE from the same latents"
    assert all(row["ratio"] is None or row["ratio"] > 0 for row in report["rows"])
    assert "| benchmark |" in result.stdout
