"""Helpers shared by test modules (test modules import from here or from conftest, never from each other)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from conftest import REPO

from instaflow_pl.cli import main


def train(module: L.LightningModule, data: Path, root: Path, **trainer_args) -> L.Trainer:
    """Three CPU steps on the triples in ``data`` with validation; checkpoints land in ``root/checkpoints``."""
    from instaflow_pl.data import TriplesDataModule

    trainer = L.Trainer(
        **{
            "max_steps": 3,
            "accelerator": "cpu",
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": root,
            **trainer_args,
        }
    )
    trainer.fit(module, TriplesDataModule(str(data), batch_size=4, val_fraction=0.25))
    return trainer


def fit_quietly(module: L.LightningModule, data: Path, root: Path, steps: int = 3) -> L.Trainer:
    """``steps`` CPU steps on the triples in ``data``, no validation, no sanity check."""
    return train(module, data, root, max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0)


def adam(params):
    """AdamW with a learning rate large enough that LoRA adapters move away from B = 0 in 3 steps."""
    return torch.optim.AdamW(params, lr=0.05)


def run_main(args: list, capsys) -> tuple[int, str, str]:
    """Run ``instaflow-pl`` in-process: exit code, stdout, stderr."""
    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(result: tuple[int, str, str], *fragments: str) -> None:
    """The command exited with code 2 and one ``instaflow-pl: error:`` line holding every fragment (no traceback)."""
    code, _, err = result
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("instaflow-pl: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def config(name: str) -> str:
    """The path of ``configs/<name>.yaml`` in this checkout."""
    return str(REPO / "configs" / f"{name}.yaml")
