"""Shared helpers of the benchmarks: quiet offline environment, timing, random datasets, the results table.

Nothing here measures anything by itself.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
"""The repository root (bench/ lives in it)."""

PROMPTS_FILE = REPO / "configs" / "tiny" / "prompts.txt"
"""The tiny prompt list the tiny configs use."""


def quiet_offline_env() -> None:
    """No network, no W&B server, no progress bars (call before importing torch, lightning or diffusers)."""
    for key, value in {
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "DIFFUSERS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }.items():
        os.environ.setdefault(key, value)


def silence_libraries() -> None:
    """Hide the info messages and warnings that Lightning, litdata, diffusers and transformers print."""
    import lightning  # noqa: F401 - Lightning sets its loggers' levels on import; override them afterwards

    warnings.filterwarnings("ignore")
    for name in (
        "lightning",
        "lightning.pytorch",
        "lightning.fabric",
        "litdata",
        "diffusers",
        "transformers",
    ):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - diffusers is a dependency
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def set_threads(threads: int) -> None:
    """Use the same number of intra-op threads everywhere in this process."""
    import torch

    torch.set_num_threads(threads)


def read_prompts(repeats: int) -> list[str]:
    """The tiny prompts, each repeated ``repeats`` times in a row (as the PromptDataModule does)."""
    from instaflow_pl.data import load_prompts

    return load_prompts(PROMPTS_FILE, repeats=repeats)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Run ``fn`` once; return (seconds, its result)."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_of_interleaved(
    runs: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, list[float]], dict[str, list[Any]]]:
    """Time callables ``repeats`` times each, interleaved (order rotated each round) so they share the noise.

    Args:
        runs: Name -> callable.
        repeats: Rounds.

    Returns:
        Name -> every measured time (seconds), and name -> every result, in round order.
    """
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, list[Any]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            seconds, result = timed(runs[name])
            times[name].append(seconds)
            results[name].append(result)
    return times, results


def fmt_times(times: Sequence[float]) -> str:
    """``best 1.234 s (all: 1.234, 1.301, 1.250)``."""
    return f"best {min(times):.3f} s (all: {', '.join(f'{t:.3f}' for t in times)})"


def read_dataset(path: Path) -> tuple[Any, Any, list[str]]:
    """(x0, x1, prompts) of a generated dataset in sample order, read through ``TriplesDataModule``."""
    import torch

    from instaflow_pl.data import TriplesDataModule

    dm = TriplesDataModule(str(path), batch_size=256, num_workers=0, shuffle=False)
    dm.setup("fit")
    x0s, x1s, indices, prompts = [], [], [], []
    for batch in dm.train_dataloader():
        x0s.append(batch.x0)
        x1s.append(batch.x1)
        indices.append(batch.index)
        prompts.extend(batch.prompts)
    order = torch.cat(indices).argsort()
    return torch.cat(x0s)[order], torch.cat(x1s)[order], [prompts[i] for i in order.tolist()]


def dir_bytes(root: Path) -> int:
    """Total size of the files under ``root``."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


@dataclass
class Row:
    """One line of the results table.

    Attributes:
        benchmark: What was measured.
        measured: The measured value, formatted.
        baseline: The baseline value, formatted.
        ratio: measured / baseline in the direction where bigger is better, unless the goal says otherwise.
        goal_min: The ratio must be at least this (None: no lower bound).
        goal_max: The ratio must be at most this (None: no upper bound).
        timing: The goal is about speed, so noisy on a busy machine (False: a check of the computation or of memory,
            which ``--quick`` applies too).
        applied: Whether the goal counts (``--quick`` shows timing goals without applying them).
        failed: The benchmark that should have produced this row crashed: a missed goal whatever the ratio.
    """

    benchmark: str
    measured: str
    baseline: str
    ratio: float | None
    goal_min: float | None = None
    goal_max: float | None = None
    timing: bool = True
    applied: bool = True
    failed: bool = False

    @classmethod
    def failure(cls, name: str) -> Row:
        """The row standing for a benchmark that crashed (it counts as a missed goal)."""
        return cls(f"{name}: FAILED (see traceback above)", "-", "-", None, failed=True)

    def quick(self) -> Row:
        """This row as ``--quick`` reports it: a timing goal is shown but not applied."""
        return replace(self, applied=False) if self.timing else self

    @property
    def goal(self) -> str:
        """The goal as text (``-`` for an informational row)."""
        if self.goal_min is not None and self.goal_max is not None:
            text = f"{self.goal_min:g}x .. {self.goal_max:g}x"
        elif self.goal_min is not None:
            text = f">= {self.goal_min:g}x"
        elif self.goal_max is not None:
            text = f"<= {self.goal_max:g}x"
        else:
            return "-"
        return text if self.applied else f"({text}, not applied)"

    @property
    def met(self) -> bool | None:
        """Whether the goal is met: False for a failed benchmark, None for an informational row or a goal not
        applied."""
        if self.failed:
            return False
        if not self.applied or self.ratio is None or (self.goal_min is None and self.goal_max is None):
            return None
        low_ok = self.goal_min is None or self.ratio >= self.goal_min
        high_ok = self.goal_max is None or self.ratio <= self.goal_max
        return low_ok and high_ok


def markdown_table(rows: Sequence[Row]) -> str:
    """The rows as a markdown table: benchmark | measured | baseline | ratio | goal | met?."""
    lines = ["| benchmark | measured | baseline | ratio | goal | met? |", "|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        met = "FAILED" if row.failed else {True: "yes", False: "NO", None: "-"}[row.met]
        lines.append(f"| {row.benchmark} | {row.measured} | {row.baseline} | {ratio} | {row.goal} | {met} |")
    return "\n".join(lines)
