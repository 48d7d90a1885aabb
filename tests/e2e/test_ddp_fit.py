"""``fit`` on two CPU processes (DDP over gloo) with the tiny reflow config, callbacks included.

The loss goes down, the checkpoints it writes load in a single process (``validate``), and validation metrics are
reduced across the ranks: the value logged under DDP (each rank scoring its half of the held-out set) equals the
value one process computes over the whole set from the same checkpoint. The held-out split (8 triples) is smaller
than batch size x ranks (8 x 2), the case where litdata used to hand one rank no validation batch at all, and that
rank then skipped the metric reduction the other waited for.
"""

from __future__ import annotations

import csv
import socket

import pytest
import yaml
from conftest import REPO, write_dataset
from helpers import run_process_group

from instaflow_pl.cli import cli_main

pytestmark = pytest.mark.slow

METRICS = ("val/mse@1", "val/mse@8", "val/straightness")


def ddp_config(tmp_path):
    """configs/tiny/sd/reflow.yaml, checkpointing every 4 steps and keeping each checkpoint."""
    config = yaml.safe_load((REPO / "configs/tiny/sd/reflow.yaml").read_text())
    for callback in config["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ModelCheckpoint"):
            callback["init_args"].update(every_n_train_steps=4, save_top_k=-1)
        if callback["class_path"].endswith("SampleQuality"):
            callback["init_args"]["cache_dir"] = str(tmp_path / "fid-cache")
    path = tmp_path / "reflow.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_fit_on_two_ddp_cpu_ranks(tiny_sd, tmp_path):
    data = write_dataset(tmp_path / "pairs", count=40, shard_size=8)  # 32 train (16 a rank), 8 held out
    config = ddp_config(tmp_path)
    root = tmp_path / "run"
    common = [
        "--config",
        str(config),
        f"--model.init_args.base_model={tiny_sd}",
        f"--data.init_args.path={data}",
        "--data.init_args.batch_size=8",
        "--trainer.limit_val_batches=1.0",  # the whole held-out set
        "--trainer.enable_progress_bar=false",
    ]
    fit = run_process_group(
        ["fit", *common, f"--trainer.default_root_dir={root}", "--trainer.strategy=ddp", "--trainer.devices=2",
         "--trainer.max_steps=16", "--trainer.val_check_interval=4", "--trainer.log_every_n_steps=1",
         "--trainer.logger=lightning.pytorch.loggers.CSVLogger"],
        env={"MASTER_PORT": "29627", "OMP_NUM_THREADS": "1"},
        timeout=400,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]

    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    losses = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    assert len(losses) == 16
    assert sum(losses[-4:]) < 0.9 * sum(losses[:4]), f"the loss does not go down: {losses}"
    validations = [r for r in rows if r.get("val/mse@1")]
    assert len(validations) == 4, "a validation every 4 steps"

    # The step-4 checkpoint, validated by one process over the whole held-out set.
    checkpoint = next((root / "checkpoints").glob("*step=4.ckpt"))
    single = cli_main(
        ["validate", *common, f"--trainer.default_root_dir={tmp_path / 'single'}", "--trainer.logger=false",
         f"--ckpt_path={checkpoint}"]
    )  # fmt: skip
    assert single.trainer.world_size == 1
    for key in METRICS:
        reduced, one_process = float(validations[0][key]), float(single.trainer.callback_metrics[key])
        # Equal up to float32 summation order (two rank batches of 4 against one batch of 8).
        assert reduced == pytest.approx(one_process, rel=1e-5, abs=1e-8), key


def test_a_setup_error_on_one_rank_ends_every_rank_with_one_line(tiny_sd, tmp_path):
    """Rank 1's dataset folder is missing (the path names each rank's own copy, ``pairs-0`` and ``pairs-1``, and only
    rank 0's exists): both ranks stop, with exit status 2 and rank 1's error printed once, without a traceback."""
    import psutil

    write_dataset(tmp_path / "pairs-0", count=40, shard_size=8)
    args = [
        "fit", "--config", str(REPO / "configs/tiny/sd/reflow.yaml"), f"--model.init_args.base_model={tiny_sd}",
        f"--data.init_args.path={tmp_path}/pairs-${{oc.env:LOCAL_RANK,0}}", "--data.init_args.batch_size=8",
        f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.strategy=ddp", "--trainer.devices=2",
        "--trainer.max_steps=2", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    with socket.socket() as sock:  # a free port: other test runs may be using the fixed ones
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    fit = run_process_group(args, env={"MASTER_PORT": port, "OMP_NUM_THREADS": "1"}, timeout=300)
    errors = [line for line in fit.stderr.splitlines() if "error:" in line]
    assert fit.returncode == 2, fit.stderr[-3000:]
    assert errors == [
        f"instaflow-pl: error: rank 1 of 2: {tmp_path}/pairs-1/manifest.json not found: the folder is not a generated "
        "dataset (run pair generation first)"
    ], fit.stderr[-3000:]
    assert "Traceback" not in fit.stderr, fit.stderr[-3000:]
    left = [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    for process in left:  # rank 1 may still be on its way out
        process.wait(timeout=30)
