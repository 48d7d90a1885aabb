"""One progress bar per long step: a fit bounded by ``max_steps`` counts steps out of ``max_steps``, with its rate."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, _update_n


def is_step_bounded(trainer: Trainer) -> bool:
    """Whether a fit ends at ``trainer.max_steps`` rather than after a number of epochs."""
    return trainer.max_steps > 0 and trainer.max_epochs in (None, -1)


class StepProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with one bar per long step and steps out of ``max_steps`` for step-bounded fits.

    A fit bounded by ``trainer.max_steps`` (``max_epochs: -1``, as the project's configs are) shows one bar over all
    its optimizer steps, ``train: 900/2000 [..., 29.5it/s, loss=...]`` (a resumed run starts where it stopped), instead
    of a bar per epoch titled ``Epoch 4/-2``. Validation inside a fit (a batch or two, plus the sampling callbacks)
    draws no bar of its own; ``validate``, ``test`` and ``predict`` (pair generation) each draw one.

    Args:
        refresh_rate: Update the bar every this many steps.
        process_position: Vertical position of the bars (for several trainers in one process).
        leave: Keep a finished epoch's bar on screen (epoch-bounded fits only).
        min_interval: Seconds between redraws (default: 0.1 on a terminal, 10 when the output goes to a file).
    """

    def __init__(
        self,
        refresh_rate: int = 1,
        process_position: int = 0,
        leave: bool = False,
        min_interval: float | None = None,
    ):
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=leave)
        if min_interval is None:  # a terminal redraws cheaply; a log file keeps every frame
            min_interval = 0.1 if sys.stderr.isatty() else 10.0
        self.min_interval = min_interval
        self._last_refresh = -math.inf

    def _should_update(self, current: int, total: int) -> bool:
        """At most one redraw per ``min_interval`` seconds (and the last one): a redraw every step cost the digits
        demo's training about 10% (2 ms of a 21 ms step)."""
        if not self.is_enabled or current % self.refresh_rate and current != total:
            return False
        now = time.monotonic()
        if current != total and now - self._last_refresh < self.min_interval:
            return False
        self._last_refresh = now
        return True

    @property
    def train_description(self) -> str:
        """``train`` for a step-bounded fit (the bar counts steps), else Lightning's."""
        trainer = self._trainer
        return "train" if trainer is not None and is_step_bounded(trainer) else super().train_description

    def _fitting(self) -> bool:
        return self.trainer.state.fn == "fit"

    def init_sanity_tqdm(self) -> Tqdm:
        """No bar for the sanity check."""
        return Tqdm(disable=True)

    def init_validation_tqdm(self) -> Tqdm:
        """No bar for validation inside a fit; ``validate`` keeps Lightning's."""
        return Tqdm(disable=True) if self._fitting() else super().init_validation_tqdm()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Open the training bar (over all steps when the fit is step-bounded)."""
        super().on_train_start(trainer, pl_module)
        if is_step_bounded(trainer):
            bar = self.train_progress_bar
            bar.reset(total=trainer.max_steps)
            bar.initial = trainer.global_step
            bar.n = trainer.global_step
            bar.set_description("train")

    def on_train_epoch_start(self, trainer: Trainer, *args: Any) -> None:
        """Epoch-bounded: a bar per epoch (``Epoch N/max``); step-bounded: keep the one bar."""
        if is_step_bounded(trainer):
            return
        super().on_train_epoch_start(trainer, *args)
        if trainer.max_epochs not in (None, -1):
            self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch + 1}/{trainer.max_epochs}")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Advance the bar: to the optimizer step when step-bounded, else to the batch."""
        if not is_step_bounded(trainer):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        bar = self.train_progress_bar
        step = trainer.global_step
        if bar is not None and (self._should_update(step, bar.total) or step >= trainer.max_steps):
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            _update_n(bar, step)
        return None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Keep the one bar open across epochs of a step-bounded fit."""
        if not is_step_bounded(trainer):
            return super().on_train_epoch_end(trainer, pl_module)
        if not self.train_progress_bar.disable:
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        return None
