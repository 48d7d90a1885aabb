"""Checkpoints at chosen training steps: one run gives the models of several training budgets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import lightning as L

from instaflow_pl.errors import UserError


def budget_checkpoint(dirpath: str | Path, step: int) -> Path:
    """Where :class:`CheckpointAtSteps` writes the checkpoint of ``step``."""
    return Path(dirpath) / f"step={step:07d}.ckpt"


class CheckpointAtSteps(L.Callback):
    """Save a checkpoint when the optimizer step count reaches each of ``steps`` (``step=0001000.ckpt`` ...).

    With a constant learning rate after warmup, the checkpoint at step k is the model a k-step budget gives, so one
    run measures a budget curve (e.g. the student's FID after 1k, 3k and 10k steps). Files are never overwritten: a
    fit that finds budget checkpoints beyond its starting step (left by another run) stops at once with one line.

    Args:
        steps: The global steps to save at.
        dirpath: Folder of the checkpoints (default: ``<default_root_dir>/budgets``).
    """

    def __init__(self, steps: Sequence[int], dirpath: str | None = None):
        if not steps or min(steps) < 1:
            raise UserError(f"CheckpointAtSteps needs step counts >= 1, got {list(steps)}")
        self.steps = sorted(set(int(s) for s in steps))
        self.dirpath = dirpath

    def folder(self, trainer: L.Trainer) -> Path:
        """The checkpoint folder."""
        return Path(self.dirpath) if self.dirpath else Path(trainer.default_root_dir) / "budgets"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse budget checkpoints this run would have to replace (a resumed run keeps those it already wrote)."""
        start = trainer.global_step
        stale = [budget_checkpoint(self.folder(trainer), s) for s in self.steps if s > start]
        stale = [p for p in stale if p.exists()]
        if stale:
            raise UserError(
                f"{stale[0]} exists from another run, and this run (at step {start}) would write it again; "
                "move it away or choose another dirpath"
            )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        """Save when a budget is reached (every rank calls ``save_checkpoint``; rank zero writes)."""
        step = trainer.global_step
        if step in self.steps:
            path = budget_checkpoint(self.folder(trainer), step)
            trainer.save_checkpoint(path, weights_only=False)  # a full checkpoint (Lightning logs a notice if unset)
