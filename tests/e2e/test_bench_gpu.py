"""``bench/gpu.py``: every part runs at tiny shapes on the CPU (``--tiny``) and writes its JSON; the family rows'
FLOP counting and the time guards that keep a GPU run within its budget."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

FAMILY_NAMES = ("sd", "sdxl", "sd3", "flux")


@pytest.fixture
def gpu(monkeypatch):
    """The ``bench.gpu`` module (bench/ is a folder of the repository, not of the package)."""
    monkeypatch.syspath_prepend(str(REPO))
    return importlib.import_module("bench.gpu")


@pytest.mark.slow  # 30 s to 1.5 minutes on 2 shared cores: `make test-all`
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
    rows = result["rows"]
    family_rows = {name: r for r in rows for name in FAMILY_NAMES if r["benchmark"].startswith(f"tiny {name} ")}
    assert set(family_rows) == set(FAMILY_NAMES), names
    for row in family_rows.values():
        assert "few blocks" in row["benchmark"] and "MFU" in row["measured"], row
        assert row["baseline"].startswith("full depth"), row
    sharded = [row for row in result["rows"] if "sharded" in row["benchmark"]]
    assert [row["measured"] for row in sharded] == ["skipped: needs 2+ GPUs"]
    assert set(result["seconds"]) >= {"pairs", "training", "sharded", "total"}
    assert result["table"] in proc.stdout


def _counted_on_cpu(gpu, spec, config: dict) -> float:
    """FLOPs of the same reflow step on real CPU tensors, attention on the math kernel (which the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    network = gpu.build_network(config, "cpu")
    velocity = gpu._velocity(network)
    x = torch.randn(1, *gpu._latent_shape(network))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        velocity(x, torch.full((1,), 0.5), gpu.family_condition(spec, network, 1, "cpu")).sum().backward()
    return float(counter.get_total_flops())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_family_flops_are_counted_as_on_real_tensors_and_scale_with_depth(gpu, tmp_path, family):
    """The meta-device count equals the count on real tensors, and each added block adds the same FLOPs (what scaling
    a few-block run to full depth assumes)."""
    (spec,) = gpu.tiny_specs(tmp_path, names=(family,))
    key = "num_layers" if family == "sd3" else "num_single_layers"
    counts = [gpu.velocity_train_flops(spec, {**spec.config, key: depth}).flops for depth in (2, 3, 4)]
    assert counts[0] == _counted_on_cpu(gpu, spec, {**spec.config, key: 2})
    assert counts[1] - counts[0] == counts[2] - counts[1] > 0, counts


def test_time_guard_turns_a_slow_part_into_one_failed_row(gpu):
    def slow(limit: float) -> list:
        end = time.perf_counter() + 3  # without the guard: no row at all
        while time.perf_counter() < end:
            time.sleep(0.01)
        return []

    start = time.perf_counter()
    rows = gpu.run_part("slow part", slow, 0.2, "cpu")
    assert time.perf_counter() - start < 2
    assert len(rows) == 1 and rows[0].failed
    assert rows[0].benchmark == "slow part: FAILED (over its 0.2 s guard)"
    with pytest.raises(ZeroDivisionError):  # --tiny: no guard, errors reach the tests
        gpu.run_part("broken", lambda limit: [1 / 0], None, "cpu")
