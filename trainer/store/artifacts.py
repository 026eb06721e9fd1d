"""Artifact store: a local directory (the embedded default) or S3/MinIO.

The store is the truth of a run: a task is done when its result object exists. Writes are
atomic (a local write goes to a temporary file and is renamed; an S3 PUT is atomic by nature),
so a crash never leaves half a result behind. Keys are '/'-separated relative paths.

S3 credentials come from the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or an
AWS credentials file, as boto3 reads them); the endpoint from `endpoint`, AWS_ENDPOINT_URL or
S3_ENDPOINT_URL. Credentials are never logged, stored or put in error messages.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

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


#: Temporary files of unfinished writes end so; a runner removes those a killed write left.
TEMPORARY_SUFFIX = ".partial"
_UMASK = os.umask(0o022)
os.umask(_UMASK)
#: Every file the product writes gets this mode (what open() would give under the umask).
FILE_MODE = 0o666 & ~_UMASK


class DiskFullError(SelfAugmentError):
    """A write ran out of space (or quota); names the folder."""


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a file whole or not at all: `write(file)` fills a temporary file in the same
    folder, which replaces `path` once flushed to disk. A full disk raises DiskFullError
    naming the folder; no temporary file is left behind."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}{TEMPORARY_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            os.fchmod(file.fileno(), FILE_MODE)
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except (OSError, RuntimeError) as error:  # torch's writer wraps the OSError in a RuntimeError
        if _out_of_space(error):
            raise DiskFullError(
                f"no space left on {path.parent} (writing {path.name}; "
                f"{_free_bytes(path.parent)} free): free some space or point the run elsewhere"
            ) from None
        raise
    finally:
        temporary.unlink(missing_ok=True)


def _out_of_space(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised while handling, is ENOSPC or EDQUOT."""
    seen = 0
    while error is not None and seen < 8:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error, seen = error.__cause__ or error.__context__, seen + 1
    return False


def _free_bytes(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown"
    return f"{free / 2**20:.1f} MiB"


def _atomic_write(path: Path, data: bytes) -> None:
    def write(file: BinaryIO) -> None:
        file.write(data)

    atomic_write(path, write)


def remove_temporary_files(root: str | Path) -> list[Path]:
    """Remove what killed writes left under `root` (files named by atomic_write); returns them.
    Only call it while no write can be under way there (a runner holding the run lock)."""
    removed = []
    for path in Path(root).rglob(f".*{TEMPORARY_SUFFIX}"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


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
        except DiskFullError:
            raise
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
        with open(local_path, "rb") as source:
            atomic_write(target, lambda file: shutil.copyfileobj(source, file, 2**20))

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

    def _get(self, key: str) -> tuple[bytes, dict[str, Any]]:
        """The object's bytes and GET response; ArtifactNotFoundError or one StoreError line."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))
            return bytes(response["Body"].read()), response
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise ArtifactNotFoundError(f"{self.url(key)}: no such artifact") from None
            raise self._fail("read", key, error) from None
        except BotoCoreError as error:
            raise self._fail("read", key, error) from None

    def read_bytes(self, key: str) -> bytes:
        return self._get(key)[0]

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

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove the object; with `if_match`, only while its ETag is still that one."""
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {"IfMatch": if_match} if if_match else {}
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key), **condition)
        except ClientError as error:
            if if_match and _precondition_failed(error):
                return
            raise self._fail("delete", key, error) from None
        except BotoCoreError as error:
            raise self._fail("delete", key, error) from None

    def write_if(self, key: str, data: bytes, *, etag: str | None = None) -> str | None:
        """A conditional write: create the object only if it is absent (`etag` None), or
        replace it only while its ETag is `etag`. Returns the new ETag, or None when the
        condition did not hold (someone else wrote first)."""
        from botocore.exceptions import BotoCoreError, ClientError

        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            response = self.client.put_object(
                Bucket=self.bucket, Key=self._object_key(key), Body=data, **condition
            )
        except ClientError as error:
            if _precondition_failed(error):
                return None
            raise self._fail("write", key, error) from None
        except BotoCoreError as error:
            raise self._fail("write", key, error) from None
        return str(response["ETag"])

    def read_with_age(self, key: str) -> tuple[bytes, str, float]:
        """The object's bytes, its ETag, and its age in seconds by the server's own clock
        (Last-Modified against the response's Date), so client clocks do not matter."""
        from email.utils import parsedate_to_datetime

        data, response = self._get(key)
        served = response["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(served) if served else response["LastModified"]
        age = (now - response["LastModified"]).total_seconds()
        return data, str(response["ETag"]), max(0.0, age)


def _precondition_failed(error: Exception) -> bool:
    """A conditional request lost: the object changed (412) or a concurrent write won (409)."""
    code = getattr(error, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409")


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
