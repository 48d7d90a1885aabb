"""Reading a triples dataset on object storage (``s3://``, ``gs://``, ``https://`` ...): its manifest, fetched with the
client litdata streams the shards with (same credentials, same endpoint), and one clear line for each way it fails."""

from __future__ import annotations

import json
import os
from pathlib import Path

from instaflow_pl.data.manifest import MANIFEST_FILE, Manifest
from instaflow_pl.data.store import INDEX_FILE
from instaflow_pl.errors import UserError

S3_CREDENTIALS_HINT = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or ~/.aws; AWS_ENDPOINT_URL for S3-compatible stores"


def is_url(path: str) -> bool:
    """Whether ``path`` names a dataset on object storage (any ``scheme://`` but ``file://``)."""
    return "://" in path and not path.startswith("file://")


def allow_plain_http_endpoint(path: str) -> None:
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


def read_remote_manifest(url: str) -> Manifest:
    """The manifest of a dataset on object storage.

    Raises:
        UserError: one line when the store cannot be read (for ``s3://``: a missing bucket, rejected credentials, an
            unreachable endpoint, a missing manifest or index).
    """
    allow_plain_http_endpoint(url)
    if url.startswith("s3://"):
        return Manifest(**json.loads(_read_s3_dataset_manifest(url)))
    address = f"{url.rstrip('/')}/{MANIFEST_FILE}"
    try:
        text = _read_remote_text(address)
    except Exception as err:  # noqa: BLE001 - any storage failure becomes one line
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(
            f"cannot read {address} ({type(err).__name__}: {reason}); check the URL and the storage credentials "
            "(for s3://: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL or ~/.aws)"
        ) from None
    return Manifest(**json.loads(text))


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
