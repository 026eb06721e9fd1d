"""Reading s3:// dataset inputs into a local cache (boto3; works with AWS, MinIO, moto).

The client and the cache directory are the store's (selfaugment.trainer.store.s3): the same
endpoint variables and credentials as the artifact store, never logged.
An object is fetched again only when its size or ETag changed since the cached copy.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

from selfaugment.trainer.data.types import DatasetError
from selfaugment.trainer.store.s3 import cache_root, s3_client

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"


def is_s3_uri(uri: str) -> bool:
    """True for `s3://bucket[/key]` strings."""
    return uri.startswith(S3_SCHEME)


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// uri; the key may be empty or end with '/' for a prefix."""
    if not is_s3_uri(uri):
        raise DatasetError(f"dataset.uri: {uri!r} is not an s3:// uri")
    bucket, _, key = uri[len(S3_SCHEME) :].partition("/")
    if not bucket:
        raise DatasetError(f"dataset.uri: {uri!r} has no bucket name (expected s3://bucket/key)")
    return bucket, key


def _safe_relative(uri: str, relative: str) -> PurePosixPath:
    path = PurePosixPath(relative)
    if path.is_absolute() or ".." in path.parts:
        raise DatasetError(f"{uri}: refusing object key with an unsafe path: {relative!r}")
    return path


def _download(client: Any, bucket: str, key: str, size: int, etag: str, target: Path) -> None:
    """Fetch one object unless the cached copy has the same size and ETag."""
    marker = target.with_name(f".{target.name}.etag")
    cached = target.is_file() and target.stat().st_size == size and marker.is_file()
    if cached and marker.read_text() == etag:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.part-{os.getpid()}")
    logger.info("downloading s3://%s/%s (%d bytes) to %s", bucket, key, size, target)
    client.download_file(bucket, key, str(partial))
    os.replace(partial, target)
    marker.write_text(etag)


def _prune(folder: Path, present: set[Path]) -> None:
    """Delete cached files whose objects are gone from the prefix (hidden files are ours)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith(".") and path not in present:
            logger.info("removing %s: no longer in S3", path)
            path.unlink()
            path.with_name(f".{path.name}.etag").unlink(missing_ok=True)


def _error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        head: dict[str, Any] = client.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        if _error_code(error) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return head


def _fetch(client: Any, uri: str, cache: Path) -> Path:
    bucket, key = parse_s3_uri(uri)
    base = cache / "s3" / bucket
    if key and not key.endswith("/"):
        head = _head(client, bucket, key)
        if head is not None:
            target = base / _safe_relative(uri, key)
            _download(client, bucket, key, int(head["ContentLength"]), head["ETag"], target)
            return target
        key += "/"
    target_dir = base / _safe_relative(uri, key) if key else base
    count = 0
    present: set[Path] = set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for item in page.get("Contents", []):
            relative = item["Key"][len(key) :]
            if not relative or relative.endswith("/"):
                continue  # folder markers
            target = target_dir / _safe_relative(uri, relative)
            _download(client, bucket, item["Key"], int(item["Size"]), item["ETag"], target)
            present.add(target)
            count += 1
    if count == 0:
        raise DatasetError(f"{uri}: no S3 object with this key and none under this prefix")
    _prune(target_dir, present)
    logger.info("%s: %d object(s) cached under %s", uri, count, target_dir)
    return target_dir


def fetch_s3(uri: str, cache: Path | None = None, client: Any = None) -> Path:
    """Download an object (returns the file) or every object under a prefix (the folder)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    client = client if client is not None else s3_client()
    try:
        return _fetch(client, uri, cache if cache is not None else cache_root())
    except NoCredentialsError:
        raise DatasetError(
            f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "or an AWS credentials file"
        ) from None
    except ClientError as error:
        code = _error_code(error) or "error"
        message = (getattr(error, "response", None) or {}).get("Error", {}).get("Message", "")
        raise DatasetError(f"{uri}: S3 request failed ({code}) {message}".rstrip()) from None
    except BotoCoreError as error:
        raise DatasetError(f"{uri}: S3 request failed: {error}") from None
    except OSError as error:
        raise DatasetError(f"{uri}: cannot write the cached copy: {error}") from None
