"""One run per store: a runner holds its store's run lock while it runs.

- A local directory: an advisory `flock` on `<run>/.run.lock`, which the kernel releases when
  the holder exits, however it exits (SIGKILL and the OOM killer included), so a stale lock
  never blocks a resume.
- S3: a lease. The object `<prefix>/.run.lock` is created only if absent (a conditional PUT,
  `If-None-Match: *`, which AWS S3, MinIO and moto honour) and renewed every quarter lease by a
  conditional replace of the runner's own version (`If-Match`). A runner that dies stops
  renewing; once the lease has not been renewed for $SELFAUGMENT_S3_LOCK_LEASE seconds (120)
  by the server's clock, the next runner takes it over, again conditionally, so two runners
  that race for a stale lease cannot both win. A runner that loses its lease stops its run.

Either lock names its holder (pid, host, start time) in the message a second runner gets, and
`selfaugment status` says whether a runner holds the run (`run_holder`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from selfaugment.environ import env_int
from selfaugment.errors import SelfAugmentError
from selfaugment.trainer.store.artifacts import (
    ArtifactNotFoundError,
    ArtifactStore,
    S3Store,
    StoreError,
)

log = logging.getLogger(__name__)

LOCK_NAME = ".run.lock"
LEASE_VARIABLE = "SELFAUGMENT_S3_LOCK_LEASE"
DEFAULT_LEASE_SECONDS = 120


class RunLockedError(SelfAugmentError):
    """Another process is running a search in this store (or took the run over)."""


class RunLock:
    """A held run lock; `lost` turns true if an S3 lease was taken over or could not be renewed."""

    def __init__(self) -> None:
        self.lost_reason: str | None = None

    @property
    def lost(self) -> bool:
        return self.lost_reason is not None

    def check(self) -> None:
        """Raise RunLockedError when the lock was lost: the run must stop."""
        if self.lost_reason is not None:
            raise RunLockedError(self.lost_reason)


def _holder_record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}


def _describe(holder: Any) -> str:
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"`selfaugment search` (pid {holder['pid']} on {holder['host']}, since {since})"
    except (ValueError, KeyError, TypeError):
        return "another `selfaugment search`"


def _locked_message(store: ArtifactStore, holder: str) -> str:
    return (
        f"{store.uri} is in use by {holder}; wait for it to finish or stop it "
        "(running the same command again resumes the run)"
    )


@contextmanager
def hold_run_lock(store: ArtifactStore) -> Iterator[RunLock]:
    """Hold the store's run lock for the `with` block; RunLockedError names the holder."""
    if isinstance(store, S3Store):
        with _hold_lease(store) as lock:
            yield lock
        return
    path = store.local_path(LOCK_NAME)
    if path is None:
        raise StoreError(f"{store.uri}: this kind of store cannot be locked")
    with _hold_flock(store, path) as lock:
        yield lock


# -- local directories: flock ----------------------------------------------------------------
@contextmanager
def _hold_flock(store: ArtifactStore, path: Path) -> Iterator[RunLock]:
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(_locked_message(store, _file_holder(path))) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(_holder_record()).encode(), 0)
        yield RunLock()
    finally:
        os.close(descriptor)  # releases the lock


def _file_holder(path: Path) -> str:
    try:
        return _describe(json.loads(path.read_text()))
    except (OSError, ValueError):
        return "another `selfaugment search`"


# -- S3: a renewed lease ---------------------------------------------------------------------
def lease_seconds() -> int:
    return max(4, env_int(LEASE_VARIABLE, DEFAULT_LEASE_SECONDS))


@contextmanager
def _hold_lease(store: S3Store) -> Iterator[RunLock]:
    lease = lease_seconds()
    record = {**_holder_record(), "token": uuid.uuid4().hex, "lease_seconds": lease}
    etag = _acquire(store, record, lease)
    lock = RunLock()
    stop = threading.Event()
    state = {"etag": etag}
    renewer = threading.Thread(
        target=_renew,
        args=(store, record, lease, state, lock, stop),
        name="run-lock-renewal",
        daemon=True,
    )
    renewer.start()
    try:
        yield lock
    finally:
        stop.set()
        renewer.join()
        if not lock.lost:
            try:
                store.delete(LOCK_NAME, if_match=state["etag"])
            except StoreError as error:  # the lease expires by itself
                log.warning("could not release the run lock: %s", error)


def _acquire(store: S3Store, record: dict[str, Any], lease: int) -> str:
    data = json.dumps(record).encode()
    etag = store.write_if(LOCK_NAME, data)
    if etag is not None:
        return etag
    try:
        stored, stored_etag, age = store.read_with_age(LOCK_NAME)
    except ArtifactNotFoundError:  # released between the two requests: try once more
        etag = store.write_if(LOCK_NAME, data)
        if etag is None:
            raise RunLockedError(_locked_message(store, "another `selfaugment search`")) from None
        return etag
    holder = _stored_holder(stored)
    if age < lease:
        raise RunLockedError(
            _locked_message(store, _describe(holder))
            + f"; its lease was renewed {age:.0f} s ago and lapses after {lease} s without renewal"
        )
    etag = store.write_if(LOCK_NAME, data, etag=stored_etag)
    if etag is None:
        raise RunLockedError(_locked_message(store, "another `selfaugment search`"))
    log.warning(
        "took over the run lock of %s on %s: not renewed for %.0f s",
        _describe(holder),
        store.uri,
        age,
    )
    return etag


def _renew(
    store: S3Store,
    record: dict[str, Any],
    lease: int,
    state: dict[str, str],
    lock: RunLock,
    stop: threading.Event,
) -> None:
    renewed = time.monotonic()
    while not stop.wait(lease / 4):
        try:
            etag = store.write_if(
                LOCK_NAME,
                json.dumps({**record, "renewed": time.time()}).encode(),
                etag=state["etag"],
            )
        except StoreError as error:
            if time.monotonic() - renewed < lease:
                log.warning("could not renew the run lock (will retry): %s", error)
                continue
            lock.lost_reason = (
                f"{store.uri}: could not renew the run lock for {lease} s ({error}); "
                "stopping, as another runner may now take the run over"
            )
            return
        if etag is None:
            lock.lost_reason = (
                f"{store.uri}: the run lock was taken over by another runner; stopping this one"
            )
            return
        state["etag"], renewed = etag, time.monotonic()


def _stored_holder(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        return None


# -- who holds a run -------------------------------------------------------------------------
def run_holder(store: ArtifactStore) -> str | None:
    """The runner holding the store's run lock, described; None when no runner holds it."""
    if isinstance(store, S3Store):
        try:
            stored, _, age = store.read_with_age(LOCK_NAME)
        except ArtifactNotFoundError:
            return None
        holder = _stored_holder(stored)
        lease = holder.get("lease_seconds", lease_seconds()) if isinstance(holder, dict) else 0
        return _describe(holder) if age < float(lease) else None
    path = store.local_path(LOCK_NAME)
    if path is None or not path.exists():
        return None
    import fcntl

    descriptor = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _file_holder(path)
    finally:
        os.close(descriptor)
    return None
