"""Helpers shared by test modules (test modules import from here or from conftest, never from each other)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO

from instaflow_pl.cli import cli_main, main


def train(module: L.LightningModule, data: Path, root: Path, val_fraction: float = 0.25, **trainer_args) -> L.Trainer:
    """Three CPU steps on the triples in ``data`` (``val_fraction`` of them for validation); checkpoints land in
    ``root/checkpoints``."""
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
    trainer.fit(module, TriplesDataModule(str(data), batch_size=4, val_fraction=val_fraction))
    return trainer


def fit_quietly(module: L.LightningModule, data: Path, root: Path, steps: int = 3) -> L.Trainer:
    """``steps`` CPU steps on the triples in ``data``, no validation, no sanity check."""
    return train(module, data, root, 0.0, max_steps=steps, num_sanity_val_steps=0, limit_val_batches=0)


def two_step_checkpoint(module: L.LightningModule, data: Path, root: Path) -> Path:
    """Two CPU training steps of ``module`` on the triples at ``data`` (batch 4, no validation); its checkpoint."""
    from instaflow_pl.data import TriplesDataModule

    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=root,
    )
    trainer.fit(module, TriplesDataModule(str(data), batch_size=4))
    trainer.save_checkpoint(root / "last.ckpt")
    return root / "last.ckpt"


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


def run_process_group(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    """``instaflow-pl ARGS`` in a session of its own; on a hang every rank is killed, not only the launcher."""
    process = subprocess.Popen(
        [sys.executable, "-m", "instaflow_pl.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the DDP fit hung for {timeout} s (every rank killed); stderr tail:\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# ---- the training story ---------------------------------------------------------------------------------------

STORY_PROMPTS = ["a photo of a cat", "a red car in the city", "a small bird sitting on a tree", "a blue flower"]
"""The prompts of the tiny training stories."""


def story_fit(config: str, base, data, root, steps: int, lr: float, *extra: str):
    """Fit ``configs/tiny/<config>.yaml`` from ``base`` on ``data`` (``steps`` at ``lr``, ``extra`` arguments),
    validating before and after; (metrics before, metrics after, final checkpoint)."""
    cli = cli_main(
        ["--config", str(REPO / f"configs/tiny/{config}.yaml"), f"--model.init_args.base_model={base}",
         f"--data.init_args.path={data}", f"--trainer.default_root_dir={root}", f"--trainer.max_steps={steps}",
         f"--model.init_args.optimizer.init_args.lr={lr}", "--trainer.enable_progress_bar=false",
         "--trainer.enable_model_summary=false", "--trainer.val_check_interval=1000", "--trainer.limit_val_batches=2",
         "--trainer.logger=false", *extra],
        run=False,
    )  # fmt: skip
    before = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    after = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
    cli.trainer.save_checkpoint(root / "final.ckpt")
    return before, after, root / "final.ckpt"


def story_pairs(config: str, teacher, out, prompts_file, *extra: str) -> None:
    """Pairs from ``teacher`` with ``configs/tiny/<config>.yaml``, each prompt 32 times."""
    cli_main(["predict", "--config", str(REPO / f"configs/tiny/{config}.yaml"), f"--model.init_args.teacher={teacher}",
              f"--model.init_args.output_dir={out}", f"--data.init_args.prompts={prompts_file}",
              "--data.init_args.repeats=32", *extra])  # fmt: skip


# ---- W&B's offline run files ------------------------------------------------------------------------------------

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of (crc32, length, type) chunks
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` transaction log (wandb 0.31 has no Python reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, pending, records = 7, b"", []
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
        else:
            break
    parsed = []
    for chunk in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(chunk)
        parsed.append(record)
    return parsed


def item_key(item) -> str:
    """A W&B config or summary item's (possibly nested) key."""
    return item.key or ".".join(item.nested_key)
