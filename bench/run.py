"""Run every benchmark and print a table of ratios against baselines run in the same process (``make bench``).

1. ``bench.pairs``: pair generation samples/s against diffusers' ``StableDiffusionPipeline`` (same latents),
   NFE, time per batch against the UNet floor.
2. ``bench.streaming``: streaming read samples/s against an in-memory safetensors read and a tiny training
   step.
3. ``bench.memory``: peak RSS and speed of the streaming reader when the dataset grows 10x.
4. ``bench.training`` (benchmark ``training``): ReflowModule ``Trainer.fit`` samples/s against a plain PyTorch loop
   doing the same steps;
5. ``bench.training`` (benchmark ``sampling``): one-step student sampling latency against the 25-step guided teacher.

Absolute times on a shared 2-core machine mean little; the ratios compare paths timed in the same process,
interleaved, best of several rounds. Everything runs offline in a temporary folder that is removed afterwards.

A benchmark that crashes prints its traceback and leaves a FAILED row, which counts as a missed goal (``--strict``
then exits with status 1). ``--quick`` runs every benchmark at tiny sizes with fewer rounds (well under a minute on
2 cores; ``tests/e2e/test_bench.py`` runs it, so a broken benchmark fails the tests): there the speed goals are shown
but not applied, since one round on a busy machine is noise; a crash and the goals that check the computation or memory
(latents against diffusers', per-step losses of fit against the loop, NFE, peak RSS) still count.

Usage::

    .venv/bin/python bench/run.py [--quick] [--threads 1] [--only pairs streaming memory training sampling]
                                  [--strict] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402,F401 - sets the offline, quiet environment before torch is imported
from bench.common import Row, markdown_table, set_threads, silence_libraries  # noqa: E402

BENCHMARKS = ("pairs", "streaming", "memory", "training", "sampling")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="instaflow-pl benchmarks (ratios against in-process baselines)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every benchmark (default 1: with 2 threads, any concurrent job on a "
        "2-core machine makes OpenMP spin and one batch can take 100x longer)",
    )
    parser.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="benchmarks to run")
    parser.add_argument(
        "--strict",
        action="store_true",
        help="exit with status 1 when a goal is missed (a benchmark that crashed counts as one)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and fewer rounds: every benchmark in well under a minute, to check that each runs. Speed "
        "goals are reported but not applied (one round on a busy machine is noise); crashes and the goals that "
        "check the computation or memory (latents vs diffusers, fit vs loop losses, NFE, peak RSS) still count",
    )
    parser.add_argument("--keep", type=Path, default=None, help="work in this folder and keep it (default: a temp dir)")
    return parser.parse_args(argv)


def _guarded(name: str, fn: Callable[[], list[Row]], threads: int) -> list[Row]:
    """Run one benchmark; a crash becomes a failed row (and a traceback) instead of ending the run.

    Also checks that nothing changed the number of torch threads behind the benchmark's back (restores it).
    """
    import torch

    start = time.perf_counter()
    try:
        rows = fn()
    except Exception:  # noqa: BLE001 - report and go on with the other benchmarks
        traceback.print_exc()
        rows = [Row.failure(name)]
    if torch.get_num_threads() != threads:
        print(f"   warning: torch threads became {torch.get_num_threads()} during {name}; reset to {threads}")
        set_threads(threads)
    print(f"   ({name} took {time.perf_counter() - start:.1f} s)\n", flush=True)
    return rows


def _benchmarks(workdir: Path, folder: Path, threads: int, quick: bool) -> dict[str, Callable[[], list[Row]]]:
    """Each benchmark as a call returning its rows, at full or ``--quick`` sizes, in ``BENCHMARKS`` order.

    Args:
        workdir: Scratch folder (each benchmark works in a subfolder named after it).
        folder: The tiny SD folder.
        threads: Torch threads (the memory benchmark's child processes use them too).
        quick: Tiny sizes and fewer rounds.
    """
    from bench import memory, pairs, streaming, training

    def sizes(full: Any, small: Any) -> Any:
        return small if quick else full

    return {
        "pairs": lambda: pairs.run(workdir / "pairs", folder, sizes(pairs.PairsConfig(), pairs.QUICK)),
        "streaming": lambda: streaming.run(
            workdir / "streaming", folder, sizes(streaming.StreamingConfig(), streaming.QUICK)
        ),
        "memory": lambda: memory.run(workdir / "memory", threads, sizes(memory.MemoryConfig(), memory.QUICK)),
        "training": lambda: training.run_training(
            workdir / "training", folder, sizes(training.TrainingConfig(), training.QUICK_TRAINING)
        ),
        "sampling": lambda: training.run_sampling(folder, sizes(training.SamplingConfig(), training.QUICK_SAMPLING)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the selected benchmarks; print the details, the table and the wall time; return the exit status."""
    args = _parse(argv)
    # SIGTERM (e.g. `timeout`) ends the run through SystemExit, so the temporary folder is still removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    wall_start = time.perf_counter()
    import torch

    silence_libraries()
    set_threads(args.threads)
    load = os.getloadavg()
    print(
        f"# instaflow-pl benchmarks: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} at start, Python {platform.python_version()}"
        f"{'; --quick: tiny sizes, speed goals not applied' if args.quick else ''}\n",
        flush=True,
    )
    if load[0] > (os.cpu_count() or 1):
        print(
            f"warning: the machine is busy (load {load[0]:.2f} on {os.cpu_count()} CPUs): absolute numbers mean "
            "little; the ratios still compare paths timed under the same load, interleaved\n",
            flush=True,
        )

    def work(workdir: Path) -> list[Row]:
        from instaflow_pl.families import FAMILIES

        folder = FAMILIES["sd"].build_tiny(workdir / "tiny-sd")
        runs = _benchmarks(workdir, folder, args.threads, args.quick)
        rows: list[Row] = []
        for name in BENCHMARKS:
            if name in args.only:
                rows += _guarded(name, runs[name], args.threads)
        return [row.quick() for row in rows] if args.quick else rows

    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
        rows = work(args.keep)
    else:
        with tempfile.TemporaryDirectory(prefix="instaflow-bench-") as tmp:
            rows = work(Path(tmp))

    print(markdown_table(rows))
    missed = [row.benchmark for row in rows if row.met is False]
    load = os.getloadavg()
    print(
        f"\nwall time {time.perf_counter() - wall_start:.1f} s; load average {load[0]:.2f} at the end; "
        f"goals missed: {len(missed)}"
    )
    for name in missed:
        print(f"   missed: {name}")
    return 1 if (args.strict and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
