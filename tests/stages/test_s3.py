"""Triples streamed from object storage, against a real S3 server on localhost (moto's standalone server).

The server runs on 127.0.0.1 at a free port for this module only, with authentication on (moto checks signatures
once its first few unauthenticated calls, the IAM user's creation, are spent), so wrong credentials are refused as a
real store refuses them. A generated dataset is uploaded with boto3 as the README says; nothing else is contacted.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, write_dataset
from lightning.pytorch.callbacks import ModelCheckpoint

from instaflow_pl.cli import main
from instaflow_pl.data import TriplesDataModule
from instaflow_pl.data.triples import TripleBatch

BUCKET = "bucket"
IAM_SETUP_CALLS = 3  # create_user, put_user_policy, create_access_key: moto checks credentials after these


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, an IAM user's keys, and a bucket holding a 40-sample dataset under pairs/."""
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "server.log"
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(IAM_SETUP_CALLS)}
    with log.open("w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out, env=env
        )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"moto's server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.1)
        anonymous = {"endpoint_url": endpoint, "region_name": "us-east-1"}
        iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup", **anonymous)
        iam.create_user(UserName="trainer")
        policy = '{"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}'
        iam.put_user_policy(UserName="trainer", PolicyName="s3", PolicyDocument=policy)
        key = iam.create_access_key(UserName="trainer")["AccessKey"]
        credentials = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}

        # The upload, as the README says: every file of the finished folder under one prefix.
        local = write_dataset(tmp_path_factory.mktemp("local") / "pairs", count=40, shard_size=8)
        s3 = boto3.client(
            "s3",
            aws_access_key_id=credentials["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=credentials["AWS_SECRET_ACCESS_KEY"],
            **anonymous,
        )
        s3.create_bucket(Bucket=BUCKET)
        for path in sorted(local.rglob("*")):
            if path.is_file():
                s3.upload_file(str(path), BUCKET, f"pairs/{path.relative_to(local).as_posix()}")
        # The same dataset without its index (an interrupted upload).
        for path in sorted(local.glob("*")):
            if path.is_file() and path.name != "index.json":
                s3.upload_file(str(path), BUCKET, f"partial/{path.name}")
        yield {"endpoint": endpoint, "credentials": credentials, "local": local}
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def s3_env(s3_server, monkeypatch, tmp_path):
    """The environment a user sets for an S3-compatible store; no ~/.aws file, no proxy."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in s3_server["credentials"].items():
        monkeypatch.setenv(name, value)
    return s3_server


class Killed(Exception):
    """Stands in for a kill: the run stops without saving anything."""


class Recorder(L.LightningModule):
    """Fits a scalar to the batches and records each batch's sample indices and a checksum of its tensors."""

    def __init__(self, crash_at: int | None = None):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[list[int], float, float, list[str]]] = []
        self.crash_at = crash_at

    def training_step(self, batch: TripleBatch, batch_idx: int):
        if self.crash_at is not None and self.global_step == self.crash_at:
            raise Killed
        self.seen.append((batch.index.tolist(), float(batch.x0.sum()), float(batch.x1.sum()), batch.prompts))
        return ((batch.x1 - self.weight) ** 2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(path: str, ckpt_dir: Path, cache_dir: Path | None = None, crash_at: int | None = None, ckpt_path=None):
    """24 steps (2.4 epochs of 10 batches), shuffled, a checkpoint every 3 steps; the module, however it ended."""
    module = Recorder(crash_at)
    data = TriplesDataModule(path, batch_size=4, shuffle=True, seed=5, cache_dir=str(cache_dir) if cache_dir else None)
    checkpoint = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, save_last=True)
    trainer = L.Trainer(
        max_steps=24,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except Killed:
        pass
    return module


def test_a_fit_from_the_bucket_sees_the_local_batches_and_resumes_exactly(s3_env, tmp_path):
    local = fit(str(s3_env["local"]), tmp_path / "local")
    cache = tmp_path / "cache"
    remote = fit(f"s3://{BUCKET}/pairs", tmp_path / "remote", cache_dir=cache)
    assert len(remote.seen) == 24
    assert remote.seen == local.seen, "the same batches (indices, tensors, prompts) in the same order"
    assert torch.equal(remote.weight, local.weight)
    assert any(cache.rglob("*.bin")), "the shards were streamed through the cache folder"

    interrupted = fit(f"s3://{BUCKET}/pairs", tmp_path / "run", cache_dir=tmp_path / "cache2", crash_at=7)
    assert len(interrupted.seen) == 7  # the last checkpoint is at step 6, mid-epoch
    resumed = fit(
        f"s3://{BUCKET}/pairs", tmp_path / "run", cache_dir=tmp_path / "cache2", ckpt_path=tmp_path / "run/last.ckpt"
    )
    assert interrupted.seen[:6] + resumed.seen == local.seen
    assert torch.equal(resumed.weight, local.weight)


def _cli_error(args: list[str], capsys) -> tuple[str, float]:
    capsys.readouterr()
    start = time.monotonic()
    with pytest.raises(SystemExit) as stop:
        main(args)
    seconds = time.monotonic() - start
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.strip().splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0] == err.strip().splitlines()[-1], err[-3000:]
    return lines[0], seconds


@pytest.mark.parametrize(
    "url, credentials, says",
    [
        ("s3://no-such-bucket/pairs", None, ["bucket 'no-such-bucket' does not exist at http://127.0.0.1:"]),
        ("s3://bucket/partial", None, ["s3://bucket/partial has no index.json", "upload the whole folder"]),
        ("s3://bucket/nothing", None, ["s3://bucket/nothing has no manifest.json"]),
        ("s3://bucket/pairs", "wrong-secret", ["(SignatureDoesNotMatch: AWS_SECRET_ACCESS_KEY does not match"]),
        ("s3://bucket/pairs", "unknown-key", ["(InvalidAccessKeyId: the store does not know AWS_ACCESS_KEY_ID)"]),
    ],
    ids=["missing-bucket", "missing-index", "missing-manifest", "wrong-secret", "unknown-key"],
)
def test_storage_problems_are_one_line(s3_env, tiny_sd, tmp_path, capsys, monkeypatch, url, credentials, says):
    if credentials == "wrong-secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    elif credentials == "unknown-key":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWN000000000")
    args = [
        "fit",
        "--config",
        str(REPO / "configs/tiny/sd/reflow.yaml"),
        f"--model.init_args.base_model={tiny_sd}",
        f"--data.init_args.path={url}",
        f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        "--trainer.max_steps=1",
    ]
    line, seconds = _cli_error(args, capsys)
    print(f"{url} ({credentials or 'right credentials'}): {seconds:.2f} s: {line}")
    assert line.startswith("instaflow-pl: error: "), line
    for fragment in says:
        assert fragment in line, f"{fragment!r} not in: {line}"
    assert seconds < 30, f"the error took {seconds:.1f} s"
