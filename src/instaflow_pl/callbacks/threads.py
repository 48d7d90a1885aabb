"""Threads that follow the machine's load: every core while the machine is otherwise idle, one when it is shared.

The project's commands run with OpenMP threads that spin briefly before they sleep (:mod:`instaflow_pl.runtime`):
on an idle machine the hand-off between the thousands of small parallel regions of a training step costs no wake-up,
so two threads run the demo's step about 2x faster than sleeping threads. On a shared machine, a spinning thread that
the OS deschedules holds every other thread at the next barrier. :class:`AdaptiveThreads` watches how much CPU the
other processes use (``/proc/stat`` less this process's own time) and drops to one torch thread while they use more
than ``busy_cores``, back to one per core when they leave; the spare pool thread then sleeps once its spin runs out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuLoad:
    """Cores used by other processes between two calls of :meth:`others` (from ``/proc``; Linux only)."""

    def __init__(self) -> None:
        self._last = self._sample()

    @staticmethod
    def available() -> bool:
        """Whether the counters can be read here."""
        return Path("/proc/stat").is_file() and Path("/proc/self/stat").is_file()

    @staticmethod
    def _sample() -> tuple[float, float, float]:
        """(wall seconds, busy CPU seconds of the whole machine, CPU seconds of this process)."""
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
        machine = (user + nice + system + irq + softirq + steal) / _TICKS
        own = os.times()
        return time.monotonic(), machine, own.user + own.system

    def others(self) -> float:
        """Mean cores used by other processes since the previous call (or since construction)."""
        now = self._sample()
        wall = now[0] - self._last[0]
        used = (now[1] - self._last[1]) - (now[2] - self._last[2])
        self._last = now
        return max(used, 0.0) / wall if wall > 0 else 0.0


class AdaptiveThreads(Callback):
    """Switches torch's intra-op threads between ``cores`` (idle machine) and 1 (shared machine) during a run.

    Checked on the main thread at batch starts (torch's OpenMP thread count is per calling thread), at most every
    ``interval`` seconds; the first check, at the first batch, covers the time since the run's setup.

    Args:
        cores: Threads when the machine is otherwise idle.
        busy_cores: Other processes using more than this many cores (on average over the interval) make it shared.
        interval: Seconds between checks.
    """

    def __init__(self, cores: int, busy_cores: float = 0.4, interval: float = 1.0):
        self.cores = cores
        self.busy_cores = busy_cores
        self.interval = interval
        self.load: CpuLoad | None = None
        self.next_check = 0.0
        self.switches = 0

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Start counting the other processes' CPU time."""
        self.load, self.next_check = CpuLoad(), 0.0

    def _check(self, *_: Any) -> None:
        now = time.monotonic()
        if self.load is None or now < self.next_check:
            return
        self.next_check = now + self.interval
        wanted = 1 if self.load.others() > self.busy_cores else self.cores
        if torch.get_num_threads() != wanted:
            torch.set_num_threads(wanted)
            self.switches += 1

    def _restore(self, *_: Any) -> None:
        if torch.get_num_threads() != self.cores:
            torch.set_num_threads(self.cores)

    on_train_batch_start = on_validation_batch_start = on_predict_batch_start = on_test_batch_start = _check
    on_fit_end = on_predict_end = on_test_end = _restore
