"""The run's final metrics as a JSON file, so a sweep runner reads each trial's result without a logger."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from instaflow_pl.fileio import atomic_write_text


class FinalMetrics(Callback):
    """Writes the run's latest logged metrics (``trainer.callback_metrics``) to a JSON file after each validation and
    at the end of fit or test, so a sweep runner reads each trial's result without a logger.

    Args:
        path: The JSON file to write.
    """

    def __init__(self, path: str):
        self.path = Path(path)

    def _write(self, trainer) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        metrics = {}
        for name, value in trainer.callback_metrics.items():
            try:
                metrics[name] = float(value)
            except (TypeError, ValueError, RuntimeError):
                continue
        metrics["global_step"] = float(trainer.global_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(metrics, indent=1, sort_keys=True))

    def on_validation_end(self, trainer, pl_module) -> None:
        """After each validation."""
        self._write(trainer)

    def on_fit_end(self, trainer, pl_module) -> None:
        """At the end of fit."""
        self._write(trainer)

    def on_test_end(self, trainer, pl_module) -> None:
        """At the end of test."""
        self._write(trainer)
