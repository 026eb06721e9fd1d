"""Artifact store: a local directory (the embedded default) or S3/MinIO.

The store is the truth of a run: a task is done when its result object exists. Writes are
atomic (a local write goes to a temporary file and is renamed; an S3 PUT is atomic by nature),
so a crash never leaves half a result behind. Keys are '/'-separated relative paths.

S3 access goes through the one client factory, selfaugment.trainer.store.s3 (the `minio` SDK):
credentials given for one store (the operator's, from a run's Secret) or else the environment's
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, an AWS credentials file or role); the endpoint from
`endpoint`, AWS_ENDPOINT_URL or S3_ENDPOINT_URL. Credentials are never logged, stored or put in
error messages.
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
from typing import TYPE_CHECKING, Any, BinaryIO

from selfaugment.errors import SelfAugmentError

if TYPE_CHECKING:
    from selfaugment.trainer.store.s3 import Credentials


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
    """An S3 bucket and prefix (AWS S3, MinIO, or any S3-compatible server), through the
    client of selfaugment.trainer.store.s3 (`credentials` None: the environment's)."""

    def __init__(
        self,
        uri: str,
        endpoint: str | None = None,
        region: str | None = None,
        credentials: Credentials | None = None,
    ) -> None:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not uri.startswith("s3://") or not bucket:
            raise StoreError(f"invalid S3 URI {uri!r}: expected s3://bucket/prefix")
        from selfaugment.trainer.store import s3

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        try:
            self.client = s3.s3_client(endpoint, region, credentials)
        except s3.EndpointError as error:
            raise StoreError(f"{self.uri}: {error}") from None
        self.endpoint = s3.endpoint_name(endpoint)
        self.errors = s3.request_errors()

    def _object_key(self, key: str) -> str:
        _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _fail(self, action: str, key: str, error: BaseException) -> StoreError:
        """One line naming the object, the endpoint and the cause (never credentials)."""
        from selfaugment.trainer.store.s3 import describe

        return StoreError(f"{self.url(key)}: cannot {action} at {self.endpoint}: {describe(error)}")

    def _code(self, error: BaseException) -> str | None:
        from selfaugment.trainer.store.s3 import error_code

        return error_code(error)

    def _open(self, key: str) -> Any:
        """The GET response of the object (close it); ArtifactNotFoundError or a StoreError."""
        try:
            return self.client.get_object(self.bucket, self._object_key(key))
        except self.errors as error:
            if self._code(error) == "NoSuchKey":
                raise ArtifactNotFoundError(f"{self.url(key)}: no such artifact") from None
            raise self._fail("read", key, error) from None

    def _get(self, key: str) -> tuple[bytes, Any]:
        """The object's bytes and GET response headers; ArtifactNotFoundError or a StoreError."""
        response = self._open(key)
        try:
            return bytes(response.read()), response.headers
        except self.errors as error:
            raise self._fail("read", key, error) from None
        finally:
            response.close()
            response.release_conn()

    def read_bytes(self, key: str) -> bytes:
        return self._get(key)[0]

    def write_bytes(self, key: str, data: bytes) -> None:
        import io

        from selfaugment.trainer.store.s3 import part_size

        try:
            self.client.put_object(
                self.bucket,
                self._object_key(key),
                io.BytesIO(data),
                len(data),
                part_size=part_size(len(data)),
            )
        except self.errors as error:
            raise self._fail("write", key, error) from None

    def upload_file(self, local_path: Path, key: str) -> None:
        """Stream the file up; one that is larger than a part goes in parts (multipart)."""
        from selfaugment.trainer.store.s3 import part_size

        local_path = Path(local_path)
        try:
            size = local_path.stat().st_size
            self.client.fput_object(
                self.bucket, self._object_key(key), str(local_path), part_size=part_size(size)
            )
        except self.errors as error:
            raise self._fail("write", key, error) from None

    def download_file(self, key: str, local_path: Path) -> Path:
        """Stream the object into `local_path` (written whole or not at all)."""
        local_path = Path(local_path)
        response = self._open(key)
        try:
            atomic_write(local_path, lambda file: shutil.copyfileobj(response, file, 2**20))
        except DiskFullError:
            raise
        except self.errors as error:
            raise self._fail("read", key, error) from None
        finally:
            response.close()
            response.release_conn()
        return local_path

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, self._object_key(key))
            return True
        except self.errors as error:
            if self._code(error) in ("NoSuchKey", "NoSuchObject"):
                return False
            raise self._fail("stat", key, error) from None

    def list(self, prefix: str = "") -> list[str]:
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        try:
            listed = self.client.list_objects(self.bucket, prefix=full_prefix, recursive=True)
            keys = [item.object_name[strip:] for item in listed if item.object_name]
        except self.errors as error:
            raise self._fail("list", prefix or "<root>", error) from None
        return sorted(keys)

    def delete(self, key: str, *, if_match: str | None = None) -> None:
        """Remove the object; with `if_match`, only while its ETag is still that one."""
        try:
            if if_match:  # the SDK has no conditional delete: its signed request, one header more
                self._request("DELETE", key, headers={"If-Match": if_match})
            else:
                self.client.remove_object(self.bucket, self._object_key(key))
        except self.errors as error:
            if if_match and _precondition_failed(self._code(error)):
                return
            raise self._fail("delete", key, error) from None

    def write_if(self, key: str, data: bytes, *, etag: str | None = None) -> str | None:
        """A conditional write: create the object only if it is absent (`etag` None), or
        replace it only while its ETag is `etag`. Returns the new ETag, or None when the
        condition did not hold (someone else wrote first)."""
        condition = {"If-Match": etag} if etag else {"If-None-Match": "*"}
        try:
            response = self._request(
                "PUT",
                key,
                body=data,
                headers={**condition, "Content-Type": "application/octet-stream"},
            )
        except self.errors as error:
            if _precondition_failed(self._code(error)):
                return None
            raise self._fail("write", key, error) from None
        etag = response.headers.get("ETag")
        if not etag:
            raise StoreError(f"{self.url(key)}: the server at {self.endpoint} sent no ETag")
        return str(etag)

    def _request(
        self,
        method: str,
        key: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One signed request through the SDK (its retries, region and credentials), for the
        conditional headers its public methods do not pass (If-None-Match, If-Match)."""
        return self.client._execute(  # the SDK's own request path
            method, self.bucket, self._object_key(key), body=body, headers=dict(headers or {})
        )

    def read_with_age(self, key: str) -> tuple[bytes, str, float]:
        """The object's bytes, its ETag, and its age in seconds by the server's own clock
        (Last-Modified against the response's Date), so client clocks do not matter."""
        from email.utils import parsedate_to_datetime

        data, headers = self._get(key)
        try:
            modified = parsedate_to_datetime(headers["Last-Modified"])
            served = headers.get("Date")
            now = parsedate_to_datetime(served) if served else modified
        except (KeyError, TypeError, ValueError):
            raise StoreError(
                f"{self.url(key)}: the server at {self.endpoint} sent no valid Last-Modified"
            ) from None
        age = (now - modified).total_seconds()
        return data, str(headers["ETag"]), max(0.0, age)


def _precondition_failed(code: str | None) -> bool:
    """A conditional request lost: the object changed (412) or a concurrent write won (409)."""
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "HTTP 412", "HTTP 409")


def open_store(
    uri: str | Path,
    endpoint: str | None = None,
    region: str | None = None,
    credentials: Credentials | None = None,
) -> ArtifactStore:
    """A store for a local path or an s3:// URI (`credentials`: see S3Store)."""
    text = str(uri)
    if text.startswith("s3://"):
        return S3Store(text, endpoint=endpoint, region=region, credentials=credentials)
    if "://" in text and not text.startswith("file://"):
        raise StoreError(f"unsupported store URI {text!r}: use a local path or s3://bucket/prefix")
    return LocalStore(text.removeprefix("file://"))
