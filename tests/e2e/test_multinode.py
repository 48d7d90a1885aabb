"""``fit`` as a cluster runs it: 2 "nodes" of one CPU process each, started by torchrun (``--nnodes 2``, one launch per
node, as a SLURM or cloud job would start them), with ``--trainer.num_nodes=2``. The node-rank arithmetic gives the
same ranks as one node with two processes, so the per-step losses equal a single-node 2-process DDP fit."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_dataset

pytestmark = pytest.mark.slow


def free_port() -> int:
    """A TCP port nobody listens on (for the rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit_args(tiny_sd: Path, data: Path, root: Path) -> list[str]:
    """The tiny reflow fit, 6 steps, CSV-logged every step, no sampling callbacks."""
    return ["fit", "--config", str(REPO / "configs/tiny/sd/reflow.yaml"), f"--model.init_args.base_model={tiny_sd}",
            f"--data.init_args.path={data}", "--data.init_args.batch_size=4", f"--trainer.default_root_dir={root}",
            "--trainer.max_steps=6", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--trainer.callbacks=[]",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", "--trainer.strategy=ddp"]  # fmt: skip


def losses(root: Path) -> list[float]:
    rows = list(csv.DictReader(next(root.rglob("metrics.csv")).open()))
    return [float(r["train/loss"]) for r in rows if r.get("train/loss")]


def start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1",
                                                **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip


def wait(processes: list[subprocess.Popen], timeout: int) -> list[tuple[int, str]]:
    """(exit code, stderr) of each process; all are killed if one hangs."""
    results = []
    try:
        for process in processes:
            _, err = process.communicate(timeout=timeout)
            results.append((process.returncode, err))
    except subprocess.TimeoutExpired:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
        pytest.fail("a node hung; every process killed")
    return results


def test_fit_on_two_nodes_equals_two_processes_on_one_node(tiny_sd, tmp_path):
    data = write_dataset(tmp_path / "pairs", count=40, shard_size=8)
    port = free_port()
    nodes = [
        start([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", f"--node-rank={rank}",
               "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "instaflow_pl.cli",
               *fit_args(tiny_sd, data, tmp_path / "nodes"), "--trainer.num_nodes=2", "--trainer.devices=1"], {})
        for rank in (0, 1)
    ]  # fmt: skip
    for code, err in wait(nodes, timeout=600):
        assert code == 0, err[-3000:]
    one_node = start([sys.executable, "-m", "instaflow_pl.cli", *fit_args(tiny_sd, data, tmp_path / "one"),
                      "--trainer.devices=2"], {"MASTER_PORT": str(free_port())})  # fmt: skip
    ((code, err),) = wait([one_node], timeout=600)
    assert code == 0, err[-3000:]
    two_nodes, one = losses(tmp_path / "nodes"), losses(tmp_path / "one")
    print("per-step losses, 2 nodes:", two_nodes, "\n1 node x 2 processes:", one)
    assert len(two_nodes) == 6 and two_nodes == pytest.approx(one, rel=1e-6, abs=1e-9)
    assert len(list((tmp_path / "nodes").rglob("*.ckpt"))) == 1, "one checkpoint, written by global rank 0"
