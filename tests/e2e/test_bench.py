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
    "stream: held in memory / streamed (nw=0), after 1st batch samples/s",
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
    "dmd, LoRA rank 4 generator and fake score, batch 1, counted on fake tensors (32-true)",
    "dmd, LoRA rank 4 generator and fake score, batch 1, counted on fake tensors (bf16-mixed",
    "dmd, LoRA rank 4 generator and fake score, batch 1, counted on real tensors",
    "dmd, LoRA rank 4 generator and fake score, batch 1 ",
    "dmd, generator 92M of 860M, fake score full, batch 1, counted on fake tensors (32-true)",
    "dmd, generator 92M of 860M, fake score full, batch 1, counted on fake tensors (bf16-mixed",
    "dmd, generator 92M of 860M, fake score full, batch 1, counted on real tensors",
    "dmd, generator 92M of 860M, fake score full, batch 1 ",
)
"""The first words of every case ``bench/scale.py`` runs (at batch 1 with ``--tiny``; a DMD fit's row is its name
and a space, its counts' rows say how they counted)."""


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


@pytest.mark.slow  # about 3 minutes on 2 cores with the DMD cases (5 for those alone at load 7): `make test-all`
def test_scale_tiny_runs_every_case(tmp_path: Path):
    out = tmp_path / "scale.json"
    proc = _run(["-m", "bench.scale", "--tiny", "--keep", str(tmp_path / "work"), "--out", str(out)], timeout=1800)
    log = tmp_path / "work" / "child.log"
    assert proc.returncode == 0, proc.stdout[-3000:] + (log.read_text()[-5000:] if log.is_file() else "")
    cases = json.loads(out.read_text())
    _assert_rows([case["name"] + " " for case in cases], SCALE_CASES)
    assert all(case["result"]["status"] == 0 for case in cases), cases
    names = [row[0] + " " for row in _table_rows(proc.stdout)]
    _assert_rows(names, SCALE_CASES)
    _assert_dmd_cases(cases)


def _assert_dmd_cases(cases: list[dict]) -> None:
    """Each DMD fit ran (nothing is too big at tiny size) and took a generator and a fake-score step; its count on
    fake tensors equals the count on real ones, byte for byte (the fake run is the real run's bookkeeping), and
    the full fake score holds more than the LoRA one."""
    peaks = {}
    for stage in ("dmd", "dmd-lora"):
        mine = {case["kind"]: case["result"] for case in cases if case["stage"] == stage}
        assert set(mine) == {"", "count", "count-gpu", "count-real"}, mine
        fit = mine[""]
        assert not fit.get("skipped") and fit["global_step"] >= 1 and fit["generator_updates"] >= 1, fit
        fake, real = mine["count"], mine["count-real"]
        assert fake["count_bytes"] == real["count_bytes"], (fake, real)
        assert fake["peak_gib"] > fake["fixed_gib"] > 0 and mine["count-gpu"]["peak_gib"] > 0
        peaks[stage] = fake
    full, lora = peaks["dmd"], peaks["dmd-lora"]
    assert full["trained"]["fake_score"] > 20 * lora["trained"]["fake_score"] > 0
    assert full["peak_gib"] > lora["peak_gib"]


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


DMD_COUNT_SCRIPT = """
import json, sys
from bench.dmd_count import count
results = []
for folder in sys.argv[1:]:
    for lora in (None, {"rank": 4, "alpha": 4.0}):
        config = {
            "model": {"class_path": "instaflow_pl.modules.DMDModule", "init_args": {
                "base_model": folder, "lora": lora, "fake_lora": lora, "real_guidance": 1.75, "max_grad_norm": 10.0,
                "gradient_checkpointing": True, "ema_decay": 0.999,
                "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5}},
                "fake_optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-5}}}},
            "data": {"init_args": {"batch_size": 2, "expected_latent_shape": [4, 8, 8]}},
        }
        results.append([count(config, real, "32-true") for real in (False, True)])
print(json.dumps(results))
"""


@pytest.mark.slow  # about 1.5 minutes on 2 busy cores: `make test-all`
def test_dmd_count_on_fake_tensors_equals_the_count_on_real_ones(tiny_sd, tiny_velocity):
    """``bench/dmd_count.py``, which stands in for the DMD fits too big to run at SD 1.5 size: on the tiny folders
    (an SD eps teacher and a velocity teacher; full and LoRA fake scores) its count of two DMD iterations on fake
    tensors is the count on real tensors, byte for byte, and the trained fake score's gradients and AdamW moments
    show in the peak (at least three times its parameters above the weights)."""
    proc = _run(["-c", DMD_COUNT_SCRIPT, str(tiny_sd), str(tiny_velocity)], timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4
    for fake, real in results:
        assert not fake["real_tensors"] and real["real_tensors"]
        assert fake["count_bytes"] == real["count_bytes"], (fake, real)
        assert fake["peak_gib"] > fake["fixed_gib"] > 0
    for (full, _), (lora, _) in zip(results[::2], results[1::2], strict=True):
        trained = full["trained"]["fake_score"]
        assert trained > lora["trained"]["fake_score"] > 0
        assert (full["peak_gib"] - full["fixed_gib"]) * 2**30 >= 3 * 4 * trained  # grads + 2 moments, fp32
