"""One run per store: the local runner holds a lock on its run directory while it runs.

The lock is an advisory `flock` on `<run>/.run.lock`, which the kernel releases when the holder
exits, however it exits (SIGKILL and the OOM killer included), so a stale lock never blocks a
resume. The file names the holder (pid, host, start time) for the message a second runner gets.
S3 stores are not locked yet: run one `selfaugment search` per S3 prefix (the operator runs one
reconciler per AugmentSearch).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from selfaugment.errors import SelfAugmentError
from selfaugment.trainer.store.artifacts import ArtifactStore

LOCK_NAME = ".run.lock"


class RunLockedError(SelfAugmentError):
    """Another process is running a search in this store."""


@contextmanager
def hold_run_lock(store: ArtifactStore) -> Iterator[None]:
    """Hold the store's run lock for the `with` block; RunLockedError names the holder."""
    path = store.local_path(LOCK_NAME)
    if path is None:  # S3: see the module docstring
        yield
        return
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(
                f"{store.uri} is in use by {_holder(path)}; wait for it to finish or stop it "
                "(running the same command again resumes the run)"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
        return f"`selfaugment search` (pid {holder['pid']} on {holder['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another `selfaugment search`"
