"""``bench/gpu.py --tiny``: the one-GPU benchmark's every part runs at tiny shapes on the CPU and writes its JSON."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # about 2.5 minutes on 2 cores: `make test-all`


def test_gpu_benchmark_runs_at_tiny_shapes(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--tiny", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = " ".join(row["benchmark"] for row in result["rows"])
    for part in ("pairs", "reflow", "distill-l2", "distill-lpips", "latency"):
        assert part in names, names
    assert result["table"] in proc.stdout
