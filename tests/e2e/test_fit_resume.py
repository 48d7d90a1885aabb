"""A fit killed with SIGKILL mid-epoch and resumed with ``--ckpt_path last`` equals the uninterrupted fit, exactly.

Through the real command (``instaflow-pl fit --config configs/tiny/sd/reflow.yaml``) in fresh processes: one
run, one run that kills itself with a real SIGKILL before a training step (``INSTAFLOW_PL_CRASH_AT=fit_step:N``: no
exception, no ``finally``, no checkpoint on the way out), and its resumption from the last step-based checkpoint.

Tolerance: none. On a CPU with one intra-op thread (``OMP_NUM_THREADS=1``) every kernel here is deterministic, the
resumed run restores the weights, EMA, optimizer state and data-stream position bit for bit from the checkpoint, and
each training batch draws its random numbers from a generator seeded by (run seed, rank, batch index), so the logged
numbers (compared as the CSV logger's decimal strings, which round-trip floats exactly) and the final weights
(``torch.equal``) must be identical, not just close.
"""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, run_cli, write_dataset

from instaflow_pl.faults import CRASH_ENV

pytestmark = pytest.mark.slow  # three fresh processes (~6 s of imports each)

EVERY = 3  # checkpoint every 3 steps
MAX_STEPS = 15  # 32 training triples in batches of 4: 8 steps an epoch, so the run crosses an epoch boundary
KILL_AT = 11  # killed before step 11 (epoch 1, batch 3): the last checkpoint is step 9, mid-epoch


def step_checkpointing_config(tmp_path: Path, name: str = "reflow") -> Path:
    """configs/tiny/NAME.yaml with checkpoints every ``EVERY`` steps (the shipped file sets the same options)."""
    config = yaml.safe_load((REPO / f"configs/tiny/sd/{name}.yaml").read_text())
    callbacks = config["trainer"]["callbacks"]
    checkpoint = next(c for c in callbacks if c["class_path"].endswith("ModelCheckpoint"))["init_args"]
    assert checkpoint["save_last"] is True and checkpoint["every_n_train_steps"] > 0, "the config checkpoints by steps"
    checkpoint["every_n_train_steps"] = EVERY
    quality = next(c for c in callbacks if c["class_path"].endswith("SampleQuality"))["init_args"]
    quality["cache_dir"] = str(tmp_path / "fid-cache")
    path = tmp_path / "reflow.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def fit_args(config: Path, base_model: Path, data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        f"--model.init_args.base_model={base_model}",
        f"--data.init_args.path={data}",
        f"--trainer.default_root_dir={root}",
        "--data.init_args.batch_size=4",
        f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.val_check_interval=5",
        "--trainer.log_every_n_steps=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        *extra,
    ]


def logged_rows(root: Path) -> dict[tuple[int, str], dict[str, str]]:
    """Every (step, kind) row of every metrics.csv under ``root`` (kind: train or val), later versions winning."""
    rows = {}
    for path in sorted(root.rglob("metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])):
        for row in csv.DictReader(path.open()):
            if row.get("train/loss"):  # the loss only: Lightning repeats a step's missing loss-by-t bins from before
                rows[(int(row["step"]), "train")] = {"train/loss": row["train/loss"]}
            else:
                rows[(int(row["step"]), "val")] = {k: v for k, v in row.items() if v != ""}
    return rows


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("name", ["reflow", "reflow_lora"])  # full fine-tuning, and LoRA adapters only
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_fit(tiny_sd, tmp_path, name):
    data = write_dataset(tmp_path / "pairs", count=40, shard_size=8)  # val_fraction 0.2: 32 train, 8 val
    config = step_checkpointing_config(tmp_path, name)
    env = {"OMP_NUM_THREADS": "1"}

    full_root = tmp_path / "full"
    full = run_cli(fit_args(config, tiny_sd, data, full_root), env=env)
    assert full.returncode == 0, full.stderr[-3000:]

    root = tmp_path / "run"
    killed = run_cli(fit_args(config, tiny_sd, data, root), env={**env, CRASH_ENV: f"fit_step:{KILL_AT}"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    last = root / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    resume_step = state["global_step"]
    assert resume_step == KILL_AT // EVERY * EVERY
    assert 0 < resume_step % 8, "the checkpoint is mid-epoch"
    assert "combined_loader" in state["loops"]["fit_loop"]["state_dict"], "the stream position is in the checkpoint"

    resumed = run_cli(fit_args(config, tiny_sd, data, root, "--ckpt_path=last"), env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    expected = {key: row for key, row in logged_rows(full_root).items() if key[0] >= resume_step}
    got = {key: row for key, row in logged_rows(root).items() if key[0] >= resume_step}
    train_steps = sorted(step for step, kind in expected if kind == "train")
    assert train_steps == list(range(resume_step, MAX_STEPS)), "every step after the resume point is compared"
    assert any(kind == "val" for _, kind in expected), "a validation after the resume point is compared too"
    assert got == expected  # the per-step losses (and validation metrics), to the last bit

    final, reference = weights(root / "checkpoints" / "last.ckpt"), weights(full_root / "checkpoints" / "last.ckpt")
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[k], reference[k]) for k in reference), "final weights (and EMA) equal exactly"
