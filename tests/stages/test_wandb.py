"""W&B is the training configs' logger: a short offline fit, read back from the run's own ``.wandb`` file (no mocks).

Also: the config reaches the logger, and other Lightning loggers still plug in through the CLI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO, write_dataset
from helpers import item_key, read_wandb_records

from instaflow_pl.cli import cli_main
from instaflow_pl.tiny import build_tiny_clip


def test_fit_logs_metrics_and_config_to_an_offline_wandb_run(tiny_sd, tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    data = write_dataset(tmp_path / "pairs", count=32, shard_size=16)
    root = tmp_path / "run"
    cli_main(["fit", "--config", str(REPO / "configs/tiny/sd/reflow.yaml"), f"--model.init_args.base_model={tiny_sd}",
              f"--data.init_args.path={data}", f"--trainer.default_root_dir={root}", "--trainer.max_steps=2",
              "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
              "--model.init_args.optimizer.init_args.lr=0.0005",
              f"--trainer.callbacks.init_args.clip_model={build_tiny_clip(tmp_path / 'clip')}"])  # fmt: skip
    assert wandb.run is None, "the CLI finishes the run it started"

    runs = list((root / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, "the run lands below trainer.default_root_dir, which followed the override"
    deadline = time.time() + 30  # the W&B service may still be flushing the log on a busy machine
    while True:
        records = read_wandb_records(runs[0])
        kinds = [record.WhichOneof("record_type") for record in records]
        if "exit" in kinds or time.time() > deadline:
            break
        time.sleep(0.5)
    assert "exit" in kinds and records[kinds.index("exit")].exit.exit_code == 0

    run = records[kinds.index("run")].run
    assert (run.project, run.display_name) == ("instaflow-pl", "tiny-reflow")

    logged = {item_key(item) for record in records if record.HasField("history") for item in record.history.item}
    assert {"train/loss", "val/mse@1", "val/straightness"} <= logged, sorted(logged)
    assert {"val/fid@1", "val/clip@1", "val/fid@8", "val/straightness_model"} <= logged, sorted(logged)
    for image_key in ("val/samples", "val/trajectories"):
        assert any(k.startswith(image_key) for k in logged), f"{image_key} is logged as a wandb.Image"
    assert len(list(runs[0].parent.rglob("media/images/**/*.png"))) >= 2, "and their files are in the run folder"

    config = {}
    for record in records:
        if record.HasField("config"):
            config.update({item_key(item): json.loads(item.value_json) for item in record.config.update})
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.0005, "the resolved config is logged"
    assert config["trainer"]["default_root_dir"] == str(root)
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(root), "interpolation after overrides"
    assert config["t_distribution"] == "uniform", "the module's hyperparameters too"
    saved = yaml.safe_load((root / "config.yaml").read_text())
    assert saved["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.0005


def test_another_logger_replaces_wandb_from_the_command_line(tiny_sd, tmp_path):
    data = write_dataset(tmp_path / "pairs", count=32, shard_size=16)
    root = tmp_path / "run"
    cli = cli_main(["fit", "--config", str(REPO / "configs/tiny/sd/reflow.yaml"),
                    f"--model.init_args.base_model={tiny_sd}", f"--data.init_args.path={data}",
                    f"--trainer.default_root_dir={root}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                    "--trainer.enable_progress_bar=false",
                    "--trainer.logger=lightning.pytorch.loggers.CSVLogger"])  # fmt: skip
    assert type(cli.trainer.logger).__name__ == "CSVLogger" and not (root / "wandb").exists()
    log_dir = Path(cli.trainer.logger.log_dir)
    assert log_dir.is_relative_to(root), "save_dir follows trainer.default_root_dir"
    assert "val/mse@1" in (log_dir / "metrics.csv").read_text().splitlines()[0]
    hparams = yaml.safe_load((log_dir / "hparams.yaml").read_text())
    assert hparams["data"]["init_args"]["path"] == str(data), "the config reaches any logger"


def test_validate_command_prints_every_metric(tiny_sd, tmp_path, capsys):
    data = write_dataset(tmp_path / "pairs", count=32, shard_size=16)
    root = tmp_path / "run"
    common = ["--config", str(REPO / "configs/tiny/sd/reflow.yaml"), f"--model.init_args.base_model={tiny_sd}",
              f"--data.init_args.path={data}", f"--trainer.default_root_dir={root}", "--trainer.logger=false",
              "--trainer.enable_progress_bar=false",
              f"--trainer.callbacks.init_args.clip_model={build_tiny_clip(tmp_path / 'clip')}"]  # fmt: skip
    cli_main(["fit", *common, "--trainer.max_steps=2", "--trainer.val_check_interval=2"])
    checkpoint = next((root / "checkpoints").glob("*.ckpt"))
    capsys.readouterr()
    cli = cli_main(["validate", *common, f"--ckpt_path={checkpoint}"])
    printed = capsys.readouterr().out
    for key in ("val/mse@1", "val/mse@8", "val/straightness", "val/fid@1", "val/clip@1", "val/straightness_model"):
        assert key in printed and key in cli.trainer.callback_metrics, key


class Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_crafted_pickle_checkpoint_is_not_executed_on_resume(tiny_sd, tmp_path):
    from instaflow_pl.errors import UserError

    data = write_dataset(tmp_path / "pairs", count=16, shard_size=16)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": Payload(marker)}, evil)
    args = ["fit", "--config", str(REPO / "configs/tiny/sd/reflow.yaml"), f"--model.init_args.base_model={tiny_sd}",
            f"--data.init_args.path={data}", f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.logger=false",
            "--trainer.max_steps=1", "--trainer.enable_progress_bar=false", f"--ckpt_path={evil}"]  # fmt: skip
    with pytest.raises(UserError, match="not plain data, so it was not loaded"):
        cli_main(args)
    assert not marker.exists(), "the payload did not run"
    with pytest.raises(Exception):  # noqa: B017 - trusting the file runs it (and the file is no checkpoint)
        cli_main([*args, "--weights_only=false"])
    assert marker.exists(), "--weights_only=false is the explicit way to trust a pickle"
