"""DMDModule under DDP on two CPU ranks (gloo, ``ddp_find_unused_parameters_true``, as configs/sd15/dmd.yaml runs):
each rank draws its own noise (the batch seed includes the rank), yet after a few iterations, generator steps and
fake-score steps included, both ranks hold the same generator and fake score, moved from where they started: DDP
averaged the gradients of both manual backward passes."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from conftest import REPO, write_dataset
from helpers import run_process_group

pytestmark = pytest.mark.slow


class RankWeights(L.Callback):
    """Saves this rank's generator and fake-score weights at the end of the fit (``<out>/rank<N>.pt``)."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        prefixes = ("velocity.", "fake_score.", "gan_head.")
        state = {k: v.detach().clone() for k, v in module.state_dict().items() if k.startswith(prefixes)}
        torch.save({"state": state, "updates": module.generator_updates}, self.out / f"rank{trainer.global_rank}.pt")


def test_dmd_ranks_agree_on_the_generator_after_ddp_iterations(tiny_sd, tiny_velocity, tmp_path):
    data = write_dataset(tmp_path / "pairs", count=32, shard_size=8)
    config = yaml.safe_load((REPO / "configs/tiny/sd/dmd.yaml").read_text())
    config["trainer"]["callbacks"] = [
        {"class_path": "test_dmd_ddp.RankWeights", "init_args": {"out": str(tmp_path)}}
    ]  # fmt: skip
    config["trainer"].update(logger=False, limit_val_batches=0, enable_progress_bar=False, num_sanity_val_steps=0)
    path = tmp_path / "dmd.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    tests = REPO / "tests"
    pythonpath = os.pathsep.join([str(tests), str(tests / "e2e"), os.environ.get("PYTHONPATH", "")])
    fit = run_process_group(
        ["fit", "--config", str(path), f"--model.init_args.base_model={tiny_velocity}",
         f"--model.init_args.teacher={tiny_sd}", f"--data.init_args.path={data}", "--data.init_args.batch_size=4",
         "--data.init_args.val_fraction=0", "--model.init_args.generator_every=2", "--trainer.max_steps=4",
         f"--trainer.default_root_dir={tmp_path / 'run'}", "--trainer.strategy=ddp_find_unused_parameters_true",
         "--trainer.devices=2"],
        env={"MASTER_PORT": port, "OMP_NUM_THREADS": "1", "PYTHONPATH": pythonpath},
        timeout=400,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["updates"] == ranks[1]["updates"] == 2  # iterations 0 and 2 of 4
    first, second = ranks[0]["state"], ranks[1]["state"]
    assert first.keys() == second.keys() and any(k.startswith("velocity.") for k in first)
    differing = [k for k in first if not torch.equal(first[k], second[k])]
    assert not differing, differing[:5]

    from instaflow_pl.model_folder import ModelFolder

    start = ModelFolder.open(tiny_velocity).load_network().state_dict()
    moved = [k for k, v in first.items() if k.startswith("velocity.network.") and not torch.equal(v, start[k[17:]])]
    assert moved, "the generator trained"
