"""Reading s3:// dataset inputs into a local cache (the minio SDK; AWS, MinIO, moto).

The client and the cache directory are the store's (selfaugment.trainer.store.s3): the same
endpoint variables and credentials as the artifact store, never logged.
An object is fetched again only when its size or ETag changed since the cached copy.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path, PurePosixPath
from typing import Any

from selfaugment.trainer.data.types import DatasetError
from selfaugment.trainer.store.s3 import (
    MissingCredentialsError,
    cache_root,
    describe,
    error_code,
    request_errors,
    s3_client,
)

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
    response = client.get_object(bucket, key)
    try:
        with open(partial, "wb") as file:
            shutil.copyfileobj(response, file, 2**20)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        response.close()
        response.release_conn()
    os.replace(partial, target)
    marker.write_text(etag)


def _prune(folder: Path, present: set[Path]) -> None:
    """Delete cached files whose objects are gone from the prefix (hidden files are ours)."""
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith(".") and path not in present:
            logger.info("removing %s: no longer in S3", path)
            path.unlink()
            path.with_name(f".{path.name}.etag").unlink(missing_ok=True)


def _head(client: Any, bucket: str, key: str) -> Any:
    """The object's stat (size, etag), or None when no object has this key."""
    from minio.error import S3Error

    try:
        return client.stat_object(bucket, key)
    except S3Error as error:
        if error.code in ("NoSuchKey", "NoSuchObject"):
            return None
        raise


def _fetch(client: Any, uri: str, cache: Path) -> Path:
    bucket, key = parse_s3_uri(uri)
    base = cache / "s3" / bucket
    if key and not key.endswith("/"):
        head = _head(client, bucket, key)
        if head is not None:
            target = base / _safe_relative(uri, key)
            _download(client, bucket, key, int(head.size), str(head.etag), target)
            return target
        key += "/"
    target_dir = base / _safe_relative(uri, key) if key else base
    count = 0
    present: set[Path] = set()
    for item in client.list_objects(bucket, prefix=key, recursive=True):
        relative = item.object_name[len(key) :]
        if not relative or relative.endswith("/"):
            continue  # folder markers
        target = target_dir / _safe_relative(uri, relative)
        _download(client, bucket, item.object_name, int(item.size), str(item.etag), target)
        present.add(target)
        count += 1
    if count == 0:
        raise DatasetError(f"{uri}: no S3 object with this key and none under this prefix")
    _prune(target_dir, present)
    logger.info("%s: %d object(s) cached under %s", uri, count, target_dir)
    return target_dir


def fetch_s3(uri: str, cache: Path | None = None, client: Any = None) -> Path:
    """Download an object (returns the file) or every object under a prefix (the folder)."""
    from minio.error import S3Error

    client = client if client is not None else s3_client()
    try:
        return _fetch(client, uri, cache if cache is not None else cache_root())
    except MissingCredentialsError as error:
        raise DatasetError(f"{uri}: {error}") from None
    except S3Error as error:
        message = f" {error.message}" if error.message else ""
        raise DatasetError(f"{uri}: S3 request failed ({error_code(error)}){message}") from None
    except (OSError, ValueError) as error:
        if isinstance(error, OSError) and not isinstance(error, ConnectionError):
            raise DatasetError(f"{uri}: cannot write the cached copy: {error}") from None
        raise DatasetError(f"{uri}: S3 request failed: {describe(error)}") from None
    except request_errors() as error:
        raise DatasetError(f"{uri}: S3 request failed: {describe(error)}") from None
