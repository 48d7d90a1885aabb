"""Threads that follow the machine's load: every core while the machine is otherwise idle, one when it is shared.

The project's commands run with OpenMP threads that spin briefly before they sleep (:mod:`instaflow_pl.runtime`):
on an idle machine the hand-off between the thousands of small parallel regions of a training step costs no wake-up,
so two threads run the demo's step about 2x faster than sleeping threads. On a shared machine, a spinning thread that
the OS deschedules holds every other thread at the next barrier. :class:`AdaptiveThreads` watches how much CPU the
other processes use (``/proc/stat`` less this process's own time) and, while they use more than ``busy_cores``, runs
on the cores they leave free (one on a 2-core machine), back to one per core when they leave; spare pool threads
then sleep once their spin runs out.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuLoad:
    """Cores used by other processes, on the cores this process may run on, between two calls of :meth:`others`
    (from ``/proc``; Linux only)."""

    def __init__(self) -> None:
        self.cpus = {f"cpu{i}" for i in os.sched_getaffinity(0)}
        self._last = self._sample()

    @staticmethod
    def available() -> bool:
        """Whether the counters can be read here."""
        return hasattr(os, "sched_getaffinity") and Path("/proc/stat").is_file()

    def _sample(self) -> tuple[float, float, float]:
        """(wall seconds, busy CPU seconds of this process's cores, CPU seconds of this process)."""
        machine = 0
        for line in Path("/proc/stat").read_text().splitlines():
            fields = line.split()
            if fields and fields[0] in self.cpus:
                user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
                machine += user + nice + system + irq + softirq + steal
        own = os.times()
        return time.monotonic(), machine / _TICKS, own.user + own.system

    def others(self) -> float:
        """Mean cores used by other processes since the previous call (or since construction)."""
        now = self._sample()
        wall = now[0] - self._last[0]
        used = (now[1] - self._last[1]) - (now[2] - self._last[2])
        self._last = now
        return max(used, 0.0) / wall if wall > 0 else 0.0


def threads_for(cores: int, others: float, busy_cores: float = 0.4) -> int:
    """Torch threads when other processes use ``others`` cores of ``cores``: all of them while ``others`` is at most
    ``busy_cores``, else the cores they leave free (whole ones, at least 1), so no thread waits to be scheduled."""
    if others <= busy_cores:
        return cores
    return max(1, min(cores, int(cores - others)))


class AdaptiveThreads(Callback):
    """Switches torch's intra-op threads between ``cores`` (idle machine) and the cores other processes leave free
    (one, on a 2-core machine next to one busy process) during a run.

    Checked on the main thread at batch starts (torch's OpenMP thread count is per calling thread), at most every
    ``interval`` seconds; the first check, at the first batch, covers the time since the run's setup.

    Args:
        cores: Threads when the machine is otherwise idle.
        busy_cores: Other processes using more than this many cores (on average over the interval) make it shared.
        interval: Seconds between checks.
    """

    def __init__(self, cores: int, busy_cores: float = 0.4, interval: float = 1.0, patience: int = 2):
        self.cores = cores
        self.busy_cores = busy_cores
        self.interval = interval
        self.patience = patience
        self.load: CpuLoad | None = None
        self.next_check = 0.0
        self.switches = 0
        self.checks = 0
        self._pending: tuple[int, int] | None = None  # (threads wanted, checks in a row that wanted them)

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Start counting the other processes' CPU time."""
        self.load, self.next_check, self.checks, self._pending = CpuLoad(), 0.0, 0, None

    def _check(self, *_: Any) -> None:
        now = time.monotonic()
        if self.load is None or now < self.next_check:
            return
        self.next_check = now + self.interval
        others = self.load.others()
        first, self.checks = self.checks == 0, self.checks + 1
        wanted, current = threads_for(self.cores, others, self.busy_cores), torch.get_num_threads()
        if wanted == current:
            self._pending = None
            return
        seen = self._pending[1] + 1 if self._pending and self._pending[0] == wanted else 1
        self._pending = (wanted, seen)
        # the first check switches at once (the machine was busy or idle from the start); later ones need `patience`
        # checks in a row, so a short burst (a logger flushing, a compiler) does not flip the count back and forth
        if first or seen >= self.patience:
            torch.set_num_threads(wanted)
            self.switches += 1
            self._pending = None
            rank_zero_info(f"threads: {current} -> {wanted} (other processes use {others:.1f} of {self.cores} cores)")

    def _restore(self, *_: Any) -> None:
        if torch.get_num_threads() != self.cores:
            torch.set_num_threads(self.cores)

    on_train_batch_start = on_validation_batch_start = on_predict_batch_start = on_test_batch_start = _check
    on_fit_end = on_predict_end = on_test_end = _restore
