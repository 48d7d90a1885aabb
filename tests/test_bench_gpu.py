"""``bench/gpu.py --tiny``: the one-GPU benchmark's every part runs at tiny shapes on the CPU and writes its JSON."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # about 2.5 minutes on 2 cores: `make test-all`


def test_gpu_benchmark_runs_at_tiny_shapes(tmp_path, capsys):
    from bench.gpu import main

    out = tmp_path / "gpu.json"
    main(["--tiny", "--out", str(out)])
    result = json.loads(out.read_text())
    names = " ".join(row["name"] for row in result["rows"])
    for part in ("pairs", "reflow", "distill-l2", "distill-lpips", "latency"):
        assert part in names, names
    assert result["table"] in capsys.readouterr().out
