"""Memory of the streaming reader: peak RSS must stay flat when the dataset grows 10x, and so must its speed.

Writes a 1x and a 10x triples dataset (SD-sized latents 4x64x64, X1 fp16, X0 as seeds) and streams each one,
whole and shuffled, through ``TriplesDataModule(num_workers=0)`` in a fresh child process, so each peak RSS
(the process's high-water mark ``VmHWM``, reset after imports and setup) belongs to one stream. Reports peak
RSS at 1x and 10x and their ratio (a reader that held the data would grow by the dataset's size), the growth
of the resident set while streaming, and samples/s over the first and the last 10% of the batches of the 10x
stream.

Run one child by hand with ``python -m bench.memory --child DATASET_DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import REPO, Row, dir_bytes

MiB = 2**20


@dataclass(frozen=True)
class MemoryConfig:
    """Sizes of the memory benchmark.

    Attributes:
        base_count: Samples of the 1x dataset (the 10x one has ten times as many).
        latent_shape: (C, H, W) of the latents (Stable Diffusion 1.5's at 512 px).
        batch_size: Samples per batch.
        shard_size: Samples per shard.
        timeout_s: Limit for each child process.
    """

    base_count: int = 1000
    latent_shape: tuple[int, int, int] = (4, 64, 64)
    batch_size: int = 64
    shard_size: int = 256
    timeout_s: float = 120.0


QUICK = MemoryConfig(base_count=256)
"""``bench/run.py --quick``: 256 and 2560 samples (80 MiB; the 1x stream still holds several batches)."""


def _current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes.

    Read from ``VmHWM`` in ``/proc/self/status``: ``getrusage(RUSAGE_SELF).ru_maxrss`` also counts the
    parent's RSS at fork time (Linux carries it over ``exec``), so a child of a 1 GB benchmark process would
    report 1 GB. ``ru_maxrss`` is the fallback where ``/proc`` is missing.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux ``clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def child(path: Path, batch_size: int, threads: int) -> dict[str, object]:
    """Stream ``path`` once (shuffled, no workers); return RSS and per-batch timing facts.

    The peak RSS is reset once the DataModule is set up, so ``peak_rss`` is the peak while streaming, not the
    transient peak of importing torch and friends (``peak_before``), which would hide the reader's own memory.
    """
    import torch

    from bench.common import silence_libraries
    from instaflow_pl.data import TriplesDataModule

    silence_libraries()
    torch.set_num_threads(threads)
    dm = TriplesDataModule(str(path), batch_size=batch_size, num_workers=0, shuffle=True, in_memory=False)
    dm.setup("fit")
    loader = dm.train_dataloader()
    peak_before = _peak_rss()
    reset = _reset_peak_rss()
    rss_before = _current_rss()
    max_rss = rss_before
    sizes: list[int] = []
    stamps = [time.perf_counter()]
    for batch in loader:
        stamps.append(time.perf_counter())
        sizes.append(len(batch))
        max_rss = max(max_rss, _current_rss())
    return {
        "samples": sum(sizes),
        "batch_sizes": sizes,
        "durations": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "rss_before": rss_before,
        "peak_before": peak_before,
        "peak_reset": reset,
        "max_rss_sampled": max_rss,
        "peak_rss": _peak_rss(),
    }


def _run_child(path: Path, batch_size: int, threads: int, timeout_s: float) -> dict:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--child", str(path), "--batch-size", str(batch_size)]
        + ["--threads", str(threads)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child failed on {path} (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rate(sizes: list[int], durations: list[float]) -> float:
    return sum(sizes) / max(sum(durations), 1e-12)


def run(workdir: Path, threads: int, cfg: MemoryConfig = MemoryConfig()) -> list[Row]:
    """Run the memory benchmark in ``workdir``; print details; return the table rows."""
    from instaflow_pl.data.synthetic import write_random_triples

    results: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    for label, count in (("1x", cfg.base_count), ("10x", 10 * cfg.base_count)):
        root = write_random_triples(workdir / f"triples-{label}", count, cfg.shard_size, cfg.latent_shape)
        sizes[label] = dir_bytes(root)
        results[label] = _run_child(root, cfg.batch_size, threads, cfg.timeout_s)
        if results[label]["samples"] != count:
            raise RuntimeError(f"the {label} stream read {results[label]['samples']} samples, expected {count}")

    big = results["10x"]
    tenth = max(1, len(big["durations"]) // 10)
    start_rate = _rate(big["batch_sizes"][:tenth], big["durations"][:tenth])
    end_rate = _rate(big["batch_sizes"][-tenth:], big["durations"][-tenth:])
    steady_rate = _rate(big["batch_sizes"][1:], big["durations"][1:])

    print(
        f"## 3. streaming memory (latents {list(cfg.latent_shape)}, batch {cfg.batch_size}, shuffle, "
        "num_workers=0, one child process per run)"
    )
    for label, res in results.items():
        growth = res["max_rss_sampled"] - res["rss_before"]
        print(
            f"   {label:>3}: {res['samples']:6d} samples, {sizes[label] / MiB:7.1f} MiB on disk; "
            f"RSS before streaming {res['rss_before'] / MiB:7.1f} MiB, peak {res['peak_rss'] / MiB:7.1f} MiB "
            f"(imports' peak {res['peak_before'] / MiB:.1f}{'' if res['peak_reset'] else ', not reset'}), "
            f"growth while streaming {growth / MiB:6.1f} MiB; "
            f"{_rate(res['batch_sizes'], res['durations']):.0f} samples/s"
        )
    print(
        f"   10x stream: first 10% of batches {start_rate:.0f} samples/s, last 10% {end_rate:.0f} samples/s, "
        f"all but the first batch {steady_rate:.0f} samples/s"
    )

    small_peak, big_peak = results["1x"]["peak_rss"], big["peak_rss"]
    growth_small = results["1x"]["max_rss_sampled"] - results["1x"]["rss_before"]
    growth_big = big["max_rss_sampled"] - big["rss_before"]
    return [
        Row(
            "memory: peak RSS streaming 10x / 1x dataset",
            f"{big_peak / MiB:.0f} MiB ({sizes['10x'] / MiB:.0f} MiB data)",
            f"{small_peak / MiB:.0f} MiB ({sizes['1x'] / MiB:.0f} MiB data)",
            big_peak / small_peak,
            goal_max=1.1,
            timing=False,
        ),
        Row(
            "memory: extra RSS growth / extra data (10x vs 1x)",
            f"{(growth_big - growth_small) / MiB:.1f} MiB more RSS",
            f"{(sizes['10x'] - sizes['1x']) / MiB:.0f} MiB more data",
            (growth_big - growth_small) / (sizes["10x"] - sizes["1x"]),
        ),
        Row(
            "memory: 10x stream samples/s, last 10% / first 10%",
            f"{end_rate:.0f}/s (last 10%)",
            f"{start_rate:.0f}/s (first 10%)",
            end_rate / start_rate,
            goal_min=0.8,
        ),
    ]


def main(argv: list[str] | None = None) -> None:
    """``--child DIR``: stream one dataset, print a JSON line; without it: run the whole memory benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", type=Path, help="stream this dataset folder and print one JSON line")
    parser.add_argument("--batch-size", type=int, default=MemoryConfig.batch_size)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.child, args.batch_size, args.threads)))
        return
    from bench.common import markdown_table

    with tempfile.TemporaryDirectory(prefix="instaflow-bench-") as tmp:
        print(markdown_table(run(Path(tmp), args.threads)))


if __name__ == "__main__":
    main()
