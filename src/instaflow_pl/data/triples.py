"""Streaming (X0, X1, prompt) triples from a generated dataset (local folder or object-store URL) with litdata."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch

from instaflow_pl.conventions import noise_from_seed
from instaflow_pl.data.manifest import MANIFEST_FILE, Manifest
from instaflow_pl.data.store import INDEX_FILE, commit_record, decode_tensor, tail_sha256
from instaflow_pl.errors import UserError
from instaflow_pl.ranks import setup_on_every_rank


@dataclass
class TripleBatch:
    """A batch of training triples.

    Attributes:
        x0: Noise, (B, C, H, W), float32; None for data without pairs (a 1-RF draws fresh noise).
        x1: The teacher's output for that noise and prompt, (B, C, H, W), float32.
        prompts: The B prompts.
        index: Sample indices in the dataset, (B,).
    """

    x0: torch.Tensor | None
    x1: torch.Tensor
    prompts: list[str]
    index: torch.Tensor

    def __len__(self) -> int:
        return self.x1.shape[0]

    def to(self, device: torch.device | str) -> TripleBatch:
        """The batch on ``device``: itself when every tensor is already there (no copy of the dataclass)."""
        device = torch.device(device)
        tensors = (self.x0, self.x1, self.index)
        if all(t is None or _same_device(t.device, device) for t in tensors):
            return self
        x0, x1, index = (None if t is None else t.to(device, non_blocking=True) for t in tensors)
        return dataclasses.replace(self, x0=x0, x1=x1, index=index)


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class TripleDecoder:
    """Turns a stored record into float32 (x0, x1): X0 is regenerated from its seed unless it was stored.

    Args:
        manifest: The dataset's manifest (latent shape, storage dtype).
    """

    def __init__(self, manifest: Manifest):
        self.latent_shape = tuple(manifest.latent_shape)
        self.dtype = manifest.x1_dtype

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        """Decode one record."""
        if "x0" in item:
            x0 = decode_tensor(item["x0"], self.dtype).float()
        else:
            x0 = noise_from_seed(item["seed"], self.latent_shape)
        x1 = decode_tensor(item["x1"], self.dtype).float()
        return {"index": item["index"], "prompt": item["prompt"], "x0": x0, "x1": x1}


def collate_triples(items: list[dict[str, Any]]) -> TripleBatch:
    """Stack decoded records into a :class:`TripleBatch`."""
    return TripleBatch(
        x0=torch.stack([it["x0"] for it in items]),
        x1=torch.stack([it["x1"] for it in items]),
        prompts=[it["prompt"] for it in items],
        index=torch.tensor([int(it["index"]) for it in items]),
    )


def _plain(value: Any) -> Any:
    """``value`` with numpy scalars turned into Python numbers, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_plain(v) for v in value)
    return value.item() if hasattr(value, "item") and type(value).__module__ == "numpy" else value


def _resumable_loader_class():
    from litdata import StreamingDataLoader

    class ResumableStreamingDataLoader(StreamingDataLoader):
        """litdata's loader, fixed for Lightning's resume.

        After ``load_state_dict`` litdata resumes the interrupted epoch and clears its ``restore`` flag only when that
        pass is iterated to exhaustion. Lightning stops a pass once it has taken ``len(loader)`` batches, so the flag
        stayed set and the next epoch began by replaying the previous epoch's last batch. A pass that starts while
        ``restore`` is still set from an earlier pass is now a fresh epoch.
        """

        _restored_pending = False

        def load_state_dict(self, obj: dict[str, Any]) -> None:
            super().load_state_dict(obj)
            self._restored_pending = self.restore

        def state_dict(self) -> dict[str, Any]:
            # litdata's state holds numpy integers; plain ints keep checkpoints loadable with weights_only=True.
            return _plain(super().state_dict())

        def __iter__(self):
            if self.restore and not self._restored_pending:
                self.restore = False
            self._restored_pending = False
            return super().__iter__()

    return ResumableStreamingDataLoader


def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _allow_plain_http_endpoint(path: str) -> None:
    """Let litdata's obstore downloads reach an ``http://`` S3 endpoint (MinIO or moto on localhost, ...).

    litdata fetches shards with obstore, which refuses plain-HTTP endpoints unless its client is told ``allow_http``
    (the error is a bare "HTTP error: builder error"); its boto3 path has no such rule. Only for ``s3://`` datasets
    whose ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) starts with ``http://``.
    """
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if not (path.startswith("s3://") and endpoint.startswith("http://")):
        return
    from litdata.streaming import downloader

    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options["allow_http"] = True


def read_manifest(path: str) -> Manifest:
    """The manifest of a dataset folder or URL."""
    if not _is_url(path):
        return Manifest.read(Path(path).expanduser() / MANIFEST_FILE)
    _allow_plain_http_endpoint(path)
    if path.startswith("s3://"):
        return Manifest(**json.loads(_read_s3_dataset_manifest(path)))
    url = f"{path.rstrip('/')}/{MANIFEST_FILE}"
    try:
        text = _read_remote_text(url)
    except Exception as err:  # noqa: BLE001 - any storage failure becomes one line
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot read {url} ({type(err).__name__}: {reason}); check the URL and the storage credentials "
            "(for s3://: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or ~/.aws)"
        ) from None
    return Manifest(**json.loads(text))


S3_CREDENTIALS_HINT = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or ~/.aws; AWS_ENDPOINT_URL for S3-compatible stores"


def _read_s3_dataset_manifest(url: str) -> str:
    """Check an ``s3://bucket/prefix`` dataset with the client litdata streams it with (same credentials, same
    endpoint): the bucket is there and readable, and it holds ``manifest.json`` and ``index.json``; return the
    manifest's text.

    Raises:
        UserError: one line for a missing bucket, rejected credentials, an unreachable endpoint, or a missing file.
    """
    from botocore.exceptions import BotoCoreError, ClientError
    from litdata.streaming.client import S3Client

    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"

    def key(name: str) -> str:
        return f"{prefix}/{name}" if prefix else name

    def problem(err: Exception, what: str) -> UserError:
        code = str(err.response.get("Error", {}).get("Code", "")) if isinstance(err, ClientError) else ""
        if code == "NoSuchBucket":
            return UserError(f"bucket {bucket!r} does not exist at {endpoint}; check the URL {url}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden"):
            which = {
                "InvalidAccessKeyId": "the store does not know AWS_ACCESS_KEY_ID",
                "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY does not match the key",
            }.get(code, "no read access with these credentials")
            return UserError(
                f"{endpoint} refused to read s3://{bucket}/{key(what)} ({code}: {which}); check the credentials "
                f"({S3_CREDENTIALS_HINT})"
            )
        if code in ("NoSuchKey", "404", "NotFound"):
            if what == INDEX_FILE:
                return UserError(
                    f"{url} has no {INDEX_FILE}: the dataset is unfinished or only partly uploaded; finish generating "
                    "it, then upload the whole folder (index.json last)"
                )
            return UserError(f"{url} has no {what}: not a triples dataset; check the URL, or upload the whole folder")
        reason = " ".join(str(err).split())[:200]
        return UserError(f"cannot read {url}/{what} ({type(err).__name__}: {reason}); check {S3_CREDENTIALS_HINT}")

    try:
        client = S3Client().client
    except Exception as err:  # noqa: BLE001 - a missing or broken configuration is one line
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"cannot open S3 for {url} ({reason}); set {S3_CREDENTIALS_HINT}") from None
    try:
        text = client.get_object(Bucket=bucket, Key=key(MANIFEST_FILE))["Body"].read().decode()
    except (ClientError, BotoCoreError) as err:
        raise problem(err, MANIFEST_FILE) from None
    try:
        client.head_object(Bucket=bucket, Key=key(INDEX_FILE))
    except (ClientError, BotoCoreError) as err:
        raise problem(err, INDEX_FILE) from None
    return text


def _read_remote_text(url: str) -> str:
    """A small remote file, fetched the way litdata fetches the shards (same client, same credentials); fsspec for
    schemes litdata has no downloader for."""
    import tempfile

    from litdata.streaming.downloader import _DOWNLOADERS, get_downloader

    if any(url.startswith(prefix) for prefix in _DOWNLOADERS):
        with tempfile.TemporaryDirectory() as cache:
            local = str(Path(cache) / MANIFEST_FILE)
            get_downloader(url.rsplit("/", 1)[0], cache, []).download_file(url, local)
            return Path(local).read_text()
    import fsspec

    with fsspec.open(url, "r") as handle:
        return handle.read()


def check_local_dataset(root: Path) -> None:
    """Fail with one line naming the file if the index is missing, or a shard is missing, truncated, or not the one
    written for this dataset (the SHA-256 of its last 4 KiB differs from its commit record: a shard copied from
    another dataset, or changed since)."""
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise UserError(
            f"{root} has no {INDEX_FILE}: generation has not finished; rerun the same pairs command to complete it"
        )
    for chunk in json.loads(index_path.read_text())["chunks"]:
        shard = root / chunk["filename"]
        if not shard.is_file():
            raise UserError(f"shard {shard} is missing; restore it or regenerate the dataset")
        if shard.stat().st_size != chunk["chunk_bytes"]:
            raise UserError(
                f"shard {shard} is corrupt ({shard.stat().st_size} bytes, index says {chunk['chunk_bytes']}); "
                "regenerate the dataset"
            )
        record = commit_record(root, chunk["filename"])
        if record is not None and "tail_sha256" in record and tail_sha256(shard) != record["tail_sha256"]:
            raise UserError(
                f"shard {shard} does not belong to this dataset: its bytes differ from the ones recorded when it was "
                "written (a shard of another dataset, or a changed file); put the original back or regenerate the "
                "dataset"
            )


class TriplesDataModule(L.LightningDataModule):
    """Streams a generated triples dataset for reflow or distillation.

    The position in the stream is part of every Lightning checkpoint (litdata's ``StreamingDataLoader`` state), so a
    resumed fit continues from the exact sample it stopped at.

    Args:
        path: Dataset folder, or an object-store URL (``s3://bucket/prefix``, ``gs://...``) litdata can stream.
        batch_size: Triples per batch.
        num_workers: DataLoader worker processes.
        val_fraction: Fraction of the samples (taken from the end) held out for validation.
        shuffle: Shuffle the training stream (litdata shuffles shards, then samples within a window).
        seed: Seed of the shuffle.
        drop_last: Drop the last incomplete training batch. With several ranks (DDP) it is always on, so every rank
            takes the same number of steps (litdata's rule; the left-over samples differ each epoch when shuffling).
        cache_dir: Local cache for remote datasets.
        expected_latent_shape: If set, refuse a dataset whose latents have another (C, H, W).
    """

    def __init__(
        self,
        path: str,
        batch_size: int = 32,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        cache_dir: str | None = None,
        expected_latent_shape: list[int] | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise UserError(
                f"data.batch_size must be >= 1, got {batch_size}; set data.init_args.batch_size to 1 or more"
            )
        if num_workers < 0:
            raise UserError(f"data.num_workers must be >= 0, got {num_workers}")
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
        self.path = str(path)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.cache_dir = cache_dir
        self.expected_latent_shape = expected_latent_shape
        self.manifest: Manifest | None = None
        self._train = None
        self._val = None
        self._val_batch_size = batch_size

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        return trainer.world_size if trainer is not None else 1

    def _dataset(self, shuffle: bool):
        from litdata import StreamingDataset

        # Several ranks must take the same number of training steps (each step is a collective).
        drop_last = self.drop_last or self._world_size() > 1
        return StreamingDataset(
            self.path if _is_url(self.path) else str(Path(self.path).expanduser()),
            cache_dir=self.cache_dir,
            shuffle=shuffle,
            seed=self.seed,
            drop_last=drop_last if shuffle else False,
            transform=TripleDecoder(self.manifest),
            # litdata's "auto" batch decoding re-decodes many neighbours per item read when shuffling (measured:
            # 28 decodes per sample); one decode per sample is 3-8x faster and gives the same order and data.
            batch_decode=False,
        )

    @setup_on_every_rank
    def setup(self, stage: str | None = None) -> None:
        """Read and check the manifest and shards; build the train and val streams."""
        if self._train is not None:
            return
        self.manifest = read_manifest(self.path)
        if self.expected_latent_shape is not None and list(self.expected_latent_shape) != list(
            self.manifest.latent_shape
        ):
            raise UserError(
                f"triples in {self.path} have latent shape {self.manifest.latent_shape}, "
                f"but the model expects {list(self.expected_latent_shape)}; generate pairs at the model's shape"
            )
        if not _is_url(self.path):
            check_local_dataset(Path(self.path).expanduser())
        if self.val_fraction > 0:
            from litdata import train_test_split

            train, val = train_test_split(
                self._dataset(self.shuffle), [1.0 - self.val_fraction, self.val_fraction], shuffle=False
            )
            val.set_drop_last(False)  # every held-out sample counts; uneven val batches across ranks are fine
            # The same samples in the same order at every validation (and after a resume): with limit_val_batches,
            # a shuffled stream would score another subset each time.
            val.set_shuffle(False)
            self._train, self._val = train, val
            self._val_batch_size = self._rank_safe_val_batch_size(
                sum(end - start for start, end in val.region_of_interest)
            )
        else:
            self._train = self._dataset(self.shuffle)

    def _rank_safe_val_batch_size(self, count: int) -> int:
        """A validation batch size that gives every rank at least one batch.

        litdata hands each rank ``count // batch_size // world`` whole batches and the remainder to the last rank, so
        a split smaller than ``batch_size * world`` would leave a rank without validation batches; that rank would
        then skip validation while the others wait for it in the metric reduction (``sync_dist``). Batch size does
        not change the numbers: the logged means are weighted by batch size.
        """
        world, count = self._world_size(), int(count)
        if world <= 1 or count == 0:
            return self.batch_size
        if count < world:
            raise UserError(
                f"the validation split of {self.path} has {count} samples, fewer than the {world} ranks, so some rank "
                "would have nothing to validate; raise data.val_fraction or set it to 0"
            )
        return max(1, min(self.batch_size, count // world))

    def _loader(self, dataset, batch_size: int | None = None):
        return _resumable_loader_class()(
            dataset,
            batch_size=batch_size or self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_triples,
        )

    def train_dataloader(self):
        """The training stream (resumable)."""
        return self._loader(self._train)

    def val_dataloader(self):
        """The held-out stream (empty list when ``val_fraction`` is 0)."""
        return self._loader(self._val, self._val_batch_size) if self._val is not None else []
