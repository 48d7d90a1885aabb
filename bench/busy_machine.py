"""The demo's training step under each OpenMP thread policy, idle and next to CPU-bound processes.

The workload is the digits demo's real training stage: ``instaflow-pl fit --config configs/demo/1rf.yaml`` (its
residual-MLP velocity, batch 256, AdamW, EMA, the prompt cache, Lightning's loop) for ``--steps`` steps, each run in a
fresh process so the OpenMP runtime reads its environment when it loads, as the ``instaflow-pl`` command does. The
time is that of the steps after the first ``--warmup``, read by a callback (imports and setup are not counted). Each
candidate is timed alone and next to ``--competitors`` CPU-bound processes (busy loops), interleaved, best of
``--rounds``.

Why it matters: libgomp's idle threads either spin (fast hand-offs, but a spinning thread takes a core from a
neighbour, and a descheduled one holds every other thread at the next barrier) or sleep (a wake-up on every small
parallel region: the demo's steps are thousands of small ops). ``GOMP_SPINCOUNT`` spins a while, then sleeps.

Usage::

    .venv/bin/python -m bench.busy_machine [--steps 300] [--rounds 2] [--competitors 1] [--only NAME ...] [--json F]

Absolute times on a shared machine mean little; compare the ratios printed for each candidate in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
CORES = str(len(os.sched_getaffinity(0)))
CANDIDATES: dict[str, dict[str, str]] = {
    "default (instaflow_pl.runtime)": {},
    "PASSIVE, 1 thread per core (the previous default)": {"OMP_WAIT_POLICY": "PASSIVE", "INSTAFLOW_THREADS": CORES},
    "ACTIVE, 1 thread per core": {"OMP_WAIT_POLICY": "ACTIVE", "INSTAFLOW_THREADS": CORES},
    "GOMP_SPINCOUNT=300k (libgomp's default), 1 per core": {"GOMP_SPINCOUNT": "300000", "INSTAFLOW_THREADS": CORES},
    "GOMP_SPINCOUNT=30k, 1 per core": {"GOMP_SPINCOUNT": "30000", "INSTAFLOW_THREADS": CORES},
    "GOMP_SPINCOUNT=300k, adaptive": {"GOMP_SPINCOUNT": "300000"},
    "GOMP_SPINCOUNT=30k, adaptive": {"GOMP_SPINCOUNT": "30000"},
    "ACTIVE, adaptive": {"OMP_WAIT_POLICY": "ACTIVE"},
    "1 thread, PASSIVE": {"INSTAFLOW_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
}
"""Environment of each candidate on top of the command's defaults. A thread count fixes the threads; without one the
command adapts them to the machine's load (one per core when idle, one when shared: AdaptiveThreads)."""
_POLICY_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "INSTAFLOW_THREADS", "OMP_NUM_THREADS")


class StepClock(Callback):
    """Prints the seconds of the training steps after ``warmup`` (from ``BENCH_WARMUP``) when the fit ends."""

    def __init__(self) -> None:
        self.warmup = int(os.environ.get("BENCH_WARMUP", "20"))
        self.start: float | None = None

    def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()

    def on_train_end(self, trainer: Any, *_: Any) -> None:
        import torch

        steps = trainer.global_step - self.warmup
        print(f"BENCH {time.perf_counter() - self.start:.4f} {steps} {torch.get_num_threads()}", flush=True)


def _busy() -> None:
    while True:
        pass


def prepare(work: Path) -> Path:
    """The demo's base folder (velocity, text encoder, tokenizer), written by the demo's own setup stage."""
    subprocess.run(
        [sys.executable, "-m", "instaflow_pl.cli", "demo", "--stage", "setup", "--out", str(work)],
        cwd=REPO, check=True, capture_output=True, text=True,
    )  # fmt: skip
    return work / "base"


def environment(candidate: dict[str, str], warmup: int) -> dict[str, str]:
    """The child's environment: this process's, less any thread-policy variables, plus the candidate's."""
    env = {k: v for k, v in os.environ.items() if k not in _POLICY_VARIABLES}
    env["BENCH_WARMUP"] = str(warmup)
    env.update(candidate)
    return env


def fit_seconds(base: Path, work: Path, candidate: dict, steps: int, warmup: int, timeout: float) -> tuple[float, int]:
    """Seconds per training step of the demo's 1rf fit in a fresh process (``inf`` past ``timeout``), and its
    thread count."""
    command = [
        sys.executable, "-m", "instaflow_pl.cli", "fit", "--config", str(REPO / "configs/demo/1rf.yaml"),
        f"--model.init_args.base_model={base}", f"--trainer.max_steps={warmup + steps}", "--trainer.logger=false",
        "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
        "--trainer.callbacks+=bench.busy_machine.StepClock", f"--trainer.val_check_interval={warmup + steps + 1}",
        f"--trainer.default_root_dir={tempfile.mkdtemp(dir=work)}",
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            command, cwd=REPO, env=environment(candidate, warmup), capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return float("inf"), 0
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"the demo fit failed ({proc.returncode}): {proc.stderr[-2000:]}")
    _, seconds, counted, threads = line.split()
    return float(seconds) / int(counted), int(threads)


def measure(opts: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Best seconds per step of every candidate, idle and busy."""
    names = opts.only or list(CANDIDATES)
    best: dict[tuple[str, str], float] = {}
    threads: dict[tuple[str, str], int] = {}
    with tempfile.TemporaryDirectory(prefix="instaflow-busy-") as tmp:
        base = prepare(Path(tmp) / "demo")
        for _ in range(opts.rounds):
            for busy in (False, True):
                competitors = [
                    multiprocessing.Process(target=_busy, daemon=True) for _ in range(busy * opts.competitors)
                ]
                for process in competitors:
                    process.start()
                try:
                    for name in names:
                        key = (name, "busy" if busy else "idle")
                        seconds, threads[key] = fit_seconds(
                            base, Path(tmp), CANDIDATES[name], opts.steps, opts.warmup, opts.timeout
                        )
                        best[key] = min(best.get(key, float("inf")), seconds)
                finally:
                    for process in competitors:
                        process.terminate()
                        process.join()
    fastest_idle = min(best[(n, "idle")] for n in names)
    return {
        name: {
            "threads_idle": threads[(name, "idle")],
            "threads_busy": threads[(name, "busy")],
            "idle_ms": 1000 * best[(name, "idle")],
            "busy_ms": 1000 * best[(name, "busy")],
            "slowdown": best[(name, "busy")] / best[(name, "idle")],
            "idle_vs_fastest": best[(name, "idle")] / fastest_idle,
        }
        for name in names
    }


def table(rows: dict[str, dict[str, float]], opts: argparse.Namespace) -> str:
    """Markdown table of the candidates."""
    lines = [
        f"Demo 1rf training step, {opts.steps} steps after {opts.warmup}, best of {opts.rounds}; busy = "
        f"{opts.competitors} CPU-bound process(es); {len(os.sched_getaffinity(0))} cores",
        "",
        "| candidate | threads idle / busy | idle ms/step | vs fastest idle | busy ms/step | busy slowdown |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {row['threads_idle']} / {row['threads_busy']} | {row['idle_ms']:.2f} | "
            f"{row['idle_vs_fastest']:.2f}x | {row['busy_ms']:.2f} | {row['slowdown']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Time every candidate idle and busy; print the table (and write JSON with --json)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="steps before the clock starts")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--competitors", type=int, default=1)
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), default=None, help="candidates to time")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take (startup included)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    opts = parser.parse_args(argv)
    rows = measure(opts)
    print(table(rows, opts))
    if opts.json is not None:
        opts.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
