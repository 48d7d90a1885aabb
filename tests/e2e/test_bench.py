"""The benchmarks run: ``bench/run.py --quick --strict`` in every ``make test``; the SD-size benchmarks' smallest
modes (``bench/scale.py --tiny``, ``bench/prompt_cost.py --tiny``) in ``make test-all``. Each runs in a subprocess from
the repository root (``bench`` is not importable from the tests) and must exit 0 with every row of its table, so a
benchmark broken by a change in the package fails the tests instead of rotting unseen. (``bench/gpu.py --tiny``:
tests/e2e/test_bench_gpu.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

RUN_ROWS = (
    "pairs: Teacher.sample samples/s",
    "pairs: Trainer.predict + shards samples/s",
    "pairs: cli_main predict end-to-end samples/s",
    "pairs: Teacher latents max rel. err vs pipeline",
    "pairs: stored X1 (fp16) max rel. err vs pipeline",
    "pairs: NFE per sample",
    "pairs: Teacher.sample time per batch / floor",
    "pairs: Trainer.predict time per batch / floor",
    "stream: nw=0 epoch samples/s / training",
    "stream: nw=0 after 1st batch samples/s / training",
    "stream: nw=2 epoch samples/s / training",
    "stream: nw=2 after 1st batch samples/s / training",
    "stream: nw=0 epoch samples/s / in-memory safetensors",
    "stream: nw=2 epoch samples/s / in-memory safetensors",
    "memory: peak RSS streaming 10x / 1x dataset",
    "memory: extra RSS growth / extra data",
    "memory: 10x stream samples/s, last 10% / first 10%",
    "training: Trainer.fit samples/s",
    "training: per-step loss max abs diff, fit vs loop",
    "sampling: 1-step student vs 25-step CFG teacher",
    "sampling: same ratio from the parts",
)
"""The first words of every row ``bench/run.py`` prints (its sizes vary with ``--quick``)."""

SCALE_CASES = (
    "pairs (fp32 teacher",
    "unet-step alone",
    "lpips-naive alone",
    "lpips-lean alone",
    "lpips-lean-fp32 alone",
    "reflow, 92M of 860M trainable",
    "export (reflow checkpoint)",
    "reflow, LoRA rank 4",
    "distill l2, 92M",
    "distill lpips naive, 92M",
    "distill lpips lean, 92M",
    "distill lpips lean fp32",
)
"""The first words of every case ``bench/scale.py`` runs (at batch 1 with ``--tiny``)."""


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``python ARGS`` from the repository root; the output captured."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False
    )


def _table_rows(stdout: str) -> list[list[str]]:
    """The cells of each row of the markdown tables in ``stdout`` (header and rule lines left out)."""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("| ") and not line.startswith(("| benchmark |", "| stage |")):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _assert_rows(names: list[str], expected: tuple[str, ...]) -> None:
    """Each expected row is there, exactly once."""
    for prefix in expected:
        found = [name for name in names if name.startswith(prefix)]
        assert len(found) == 1, f"row {prefix!r}: found {found} among {names}"


def test_run_quick_strict_runs_every_benchmark():
    proc = _run(["bench/run.py", "--quick", "--strict"], timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _table_rows(proc.stdout)
    names = [row[0] for row in rows]
    assert not [name for name in names if "FAILED" in name], proc.stderr[-4000:]
    _assert_rows(names, RUN_ROWS)
    assert len(rows) == len(RUN_ROWS), names
    assert "goals missed: 0" in proc.stdout


@pytest.mark.slow  # about 2 minutes on 2 cores: `make test-all`
def test_scale_tiny_runs_every_case(tmp_path: Path):
    out = tmp_path / "scale.json"
    proc = _run(["-m", "bench.scale", "--tiny", "--keep", str(tmp_path / "work"), "--out", str(out)], timeout=900)
    log = tmp_path / "work" / "child.log"
    assert proc.returncode == 0, proc.stdout[-3000:] + (log.read_text()[-5000:] if log.is_file() else "")
    cases = json.loads(out.read_text())
    _assert_rows([case["name"] for case in cases], SCALE_CASES)
    assert all(case["result"]["status"] == 0 for case in cases), cases
    names = [row[0] for row in _table_rows(proc.stdout)]
    _assert_rows(names, SCALE_CASES)


@pytest.mark.slow  # about 10 s; with the other SD-size benchmarks' checks in `make test-all`
def test_prompt_cost_tiny_runs(tmp_path: Path):
    out = tmp_path / "prompt_cost.json"
    proc = _run(["-m", "bench.prompt_cost", "--tiny", "--json", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [row["benchmark"] for row in result["rows"]]
    sizes, resolutions = result["sizes"], result["resolutions"]
    expected = [
        f"{encoder} vs step @{pixels}px, {what}"
        for pixels in resolutions
        for encoder in (f"T5-XXL fwd ({sizes['t5_tokens']} tok)", "CLIP-L + CLIP-G fwd")
        for what in ("CPU time", "FLOPs")
    ]
    expected += ["T5-XXL weights, bf16", "CLIP-L + CLIP-G weights, bf16", "prompts one GB of LRU cache holds"]
    _assert_rows(names, tuple(expected))
    sides = [f"x{px // sizes['vae_factor']}x{px // sizes['vae_factor']} fp16" for px in resolutions]
    stored = [name for name in names if name.startswith("one stored embedding vs X1 latent")]
    assert len(stored) == len(sides), stored
    assert all(name.endswith(side) for name, side in zip(stored, sides, strict=True)), stored
    assert len(names) == len(expected) + len(resolutions), names
    assert [row[0] for row in _table_rows(proc.stdout)] == names
    assert "RECOMMENDATION" in result["recommendation"]


@pytest.mark.slow  # about 40 s; with the other SD-size benchmarks' checks in `make test-all`
def test_flux_memory_tiny_runs(tmp_path: Path):
    """``bench/flux_memory.py --tiny``: every layout, size and rank measured on fake tensors, the fake count of the
    validation step equal to the real one (the fake run is the real run's bookkeeping), the "what fits" table."""
    out = tmp_path / "flux_memory.json"
    proc = _run(["-m", "bench.flux_memory", "--tiny", "--json", str(out)], timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = {(s["layout"], s["pixels"], s["rank"]) for s in result["steps"]}
    assert cases == {("bf16-true", 64, 16), ("bf16-true", 64, 64), ("bf16-true", 128, 16), ("bf16-true", 128, 64),
                     ("bf16-mixed", 64, 16), ("bf16-mixed", 128, 16)}  # fmt: skip
    for step in result["steps"]:
        assert step["peak_2"] > step["peak_1"] > step["fixed"] > 0, step
    assert len(result["fits"]) == 3 * len(result["steps"])
    checked = result["validation"]
    assert checked["fake_count"] == checked["count"] > 0, checked
    assert set(result["flops"]["step"]) == {"64", "128"} and result["flops"]["encoders"]["t5"] > 0
    assert "| layout | px | LoRA rank |" in proc.stdout
