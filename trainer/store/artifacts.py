"""Artifact store: a local directory (the embedded default) or S3/MinIO.

The store is the truth of a run: a task is done when its result object exists. Writes are
atomic (a local write goes to a temporary file and is renamed; an S3 PUT is atomic by nature),
so a crash never leaves half a result behind. Keys are '/'-separated relative paths.

S3 credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an
AWS credentials file, as boto3 reads them); the endpoint from `endpoint`, AWS_ENDPOINT_URL or
S3_ENDPOINT_URL. Credentials are never logged, stored or put in error messages.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from selfaugment.errors import SelfAugmentError


class StoreError(SelfAugmentError):
    """An artifact could not be read or written; the message names the store URI and key."""


class ArtifactNotFoundError(StoreError):
    """The key holds no artifact (yet)."""


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise StoreError(f"invalid artifact key {key!r}")
    return key


class ArtifactStore(ABC):
    """Minimal object-store interface used by the search, the workers and the operator."""

    uri: str

    @abstractmethod
    def read_bytes(self, key: str) -> bytes:
        """Return the object's bytes; StoreError naming the key when it is missing."""

    @abstractmethod
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write the whole object atomically."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether the object exists."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Keys under `prefix` (recursive), sorted."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove an object if it exists."""

    def url(self, key: str) -> str:
        """A URI naming the object, for reports and status."""
        return f"{self.uri.rstrip('/')}/{key}"

    def read_json(self, key: str) -> Any:
        try:
            return json.loads(self.read_bytes(key))
        except json.JSONDecodeError as error:
            raise StoreError(f"{self.url(key)}: not valid JSON: {error}") from None

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def upload_file(self, local_path: Path, key: str) -> None:
        self.write_bytes(key, Path(local_path).read_bytes())

    def download_file(self, key: str, local_path: Path) -> Path:
        local_path = Path(local_path)
        local_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(local_path, self.read_bytes(key))
        return local_path

    def local_path(self, key: str) -> Path | None:
        """The object's path on this machine when the store is a local directory, else None."""
        return None


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class LocalStore(ArtifactStore):
    """A directory on the local filesystem."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ArtifactNotFoundError(f"{self.url(key)}: no such artifact") from None
        except OSError as error:
            raise StoreError(f"{self.url(key)}: cannot read: {error.strerror}") from None

    def write_bytes(self, key: str, data: bytes) -> None:
        try:
            _atomic_write(self._path(key), data)
        except OSError as error:
            raise StoreError(f"{self.url(key)}: cannot write: {error.strerror}") from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> list[str]:
        base = self.root / prefix if prefix else self.root
        if not base.exists():
            return []
        keys = [
            path.relative_to(self.root).as_posix()
            for path in base.rglob("*")
            if path.is_file() and not path.name.startswith(".")
        ]
        return sorted(keys)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def upload_file(self, local_path: Path, key: str) -> None:
        target = self._path(key)
        if Path(local_path).resolve() == target:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.upload.tmp")
        shutil.copyfile(local_path, temporary)
        os.replace(temporary, target)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


class S3Store(ArtifactStore):
    """An S3 bucket and prefix (AWS S3, MinIO, or any S3-compatible server)."""

    def __init__(self, uri: str, endpoint: str | None = None, region: str | None = None) -> None:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or not bucket:
            raise StoreError(f"invalid S3 URI {uri!r}: expected s3://bucket/prefix")
        from selfaugment.trainer.store.s3 import s3_client

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = s3_client(endpoint, region)
        self.endpoint = self.client.meta.endpoint_url

    def _object_key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, action: str, key: str, error: Exception) -> StoreError:
        """One line naming the object, the endpoint and the cause (never credentials)."""
        response = getattr(error, "response", None) or {}  # None for timeouts and refusals
        code = response.get("Error", {}).get("Code")
        cause = code or f"{type(error).__name__}: {error}"
        return StoreError(f"{self.url(key)}: cannot {action} at {self.endpoint}: {cause}")

    def read_bytes(self, key: str) -> bytes:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            return bytes(response["Body"].read())
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ArtifactNotFoundError(f"{self.url(key)}: no such artifact") from None
            raise self._fail("read", key, error) from None
        except BotoCoreError as error:
            raise self._fail("read", key, error) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data)
        except (ClientError, BotoCoreError) as error:
            raise self._fail("write", key, error) from None

    def exists(self, key: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._fail("stat", key, error) from None
        except BotoCoreError as error:
            raise self._fail("stat", key, error) from None

    def list(self, prefix: str = "") -> list[str]:
        from botocore.exceptions import BotoCoreError, ClientError

        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as error:
            raise self._fail("list", prefix or "<root>", error) from None
        return sorted(keys)

    def delete(self, key: str) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key))
        except (ClientError, BotoCoreError) as error:
            raise self._fail("delete", key, error) from None


def open_store(
    uri: str | Path, endpoint: str | None = None, region: str | None = None
) -> ArtifactStore:
    """A store for a local path or an s3:// URI."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3Store(text, endpoint=endpoint, region=region)
    if "://" in text and not text.startswith("file://"):
        raise StoreError(f"unsupported store URI {text!r}: use a local path or s3://bucket/prefix")
    return LocalStore(text.removeprefix("file://"))
