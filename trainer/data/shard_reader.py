"""Reading one sample's bytes out of a prepared dataset's shards, in any order.

A sample is one positioned read (os.pread) at the offset the index gives, so the reader's
memory is one sample, whatever the dataset's size; the page cache, not the process, keeps
what the disk already served. A local store's shards are read where they lie. A remote
store's (S3, MinIO) are downloaded whole, once, through the store (its client, endpoint and
credentials), into a cache folder on local disk that the ranks and loader workers of a
machine share; each download is atomic and checked against the index's SHA-256. With
`cache_shards` set, a process deletes the oldest shards it downloaded beyond that many.

The reader can be pickled into DataLoader workers: each process opens its own store client
and file descriptors (an S3 client or a descriptor is never shared across a fork).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from selfaugment.trainer.data.prepared import PreparedDataset, ShardEntry, shard_tar_key
from selfaugment.trainer.data.shards import file_sha256
from selfaugment.trainer.data.types import DatasetError
from selfaugment.trainer.store import ArtifactStore, open_store
from selfaugment.trainer.store.s3 import cache_root

# Open shard files kept per process (each is one descriptor; shards are read in bursts).
MAX_OPEN_SHARDS = 64


def default_cache_dir(key: str) -> Path:
    """Where a remote prepared dataset's shards are cached on this machine."""
    return cache_root() / "prepared" / key


class ShardReader:
    """Sample bytes by (shard, offset, length), for one prepared dataset."""

    def __init__(
        self,
        prepared: PreparedDataset,
        cache_dir: Path | None = None,
        cache_shards: int | None = None,
    ) -> None:
        if cache_shards is not None and cache_shards < 1:
            raise DatasetError(f"cache_shards must be at least 1, got {cache_shards}")
        self.key = prepared.key
        self.entries: list[ShardEntry] = prepared.shards
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir(prepared.key)
        self.cache_shards = cache_shards
        self._store_uri = prepared.store.uri
        self._endpoint: str | None = getattr(prepared.store, "endpoint", None)
        self._store: ArtifactStore | None = prepared.store
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._files: OrderedDict[int, int] = OrderedDict()
        self._downloaded: OrderedDict[int, Path] = OrderedDict()
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_files", "_downloaded", "_lock", "_open_lock", "_store"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._store = None
        self._reset()

    @property
    def store(self) -> ArtifactStore:
        """This process's store (reopened after a fork: clients are not shared)."""
        if self._pid != os.getpid():
            self._store = None
            self._reset()  # the parent's descriptors and downloads are the parent's
        if self._store is None:
            self._store = open_store(self._store_uri, endpoint=self._endpoint)
        return self._store

    def read(self, shard: int, offset: int, length: int) -> bytes:
        """`length` bytes at `offset` of shard `shard`."""
        descriptor = self._descriptor(shard)
        data = os.pread(descriptor, length, offset)
        if len(data) != length:
            raise DatasetError(
                f"{self.store.url(shard_tar_key(self.key, shard))}: shard ends before byte "
                f"{offset + length} (the index says {self.entries[shard].bytes} bytes): "
                "prepare the dataset again"
            )
        return data

    def close(self) -> None:
        """Close this process's open shard files (downloaded ones stay cached)."""
        with self._lock:
            for descriptor in self._files.values():
                os.close(descriptor)
            self._files.clear()

    def _descriptor(self, shard: int) -> int:
        store = self.store
        with self._lock:
            if shard in self._files:
                self._files.move_to_end(shard)
                if shard in self._downloaded:
                    self._downloaded.move_to_end(shard)
                return self._files[shard]
        with self._open_lock:  # one download per shard, however many threads want it
            with self._lock:
                if shard in self._files:  # another thread opened it meanwhile
                    return self._files[shard]
            try:
                descriptor = os.open(self._path(store, shard), os.O_RDONLY)
            except FileNotFoundError:  # another process evicted its download in between
                descriptor = os.open(self._download(store, shard), os.O_RDONLY)
            with self._lock:
                self._files[shard] = descriptor
                while len(self._files) > MAX_OPEN_SHARDS:
                    os.close(self._files.popitem(last=False)[1])
                self._evict()
        return descriptor

    def _path(self, store: ArtifactStore, shard: int) -> Path:
        key = shard_tar_key(self.key, shard)
        local = store.local_path(key)
        if local is not None:
            if not local.is_file():
                raise DatasetError(f"{store.url(key)}: shard missing: prepare the dataset again")
            return local
        target = self.cache_dir / f"{shard:05d}.tar"
        if target.is_file() and target.stat().st_size == self.entries[shard].bytes:
            return target
        return self._download(store, shard)

    def _download(self, store: ArtifactStore, shard: int) -> Path:
        key = shard_tar_key(self.key, shard)
        target = self.cache_dir / f"{shard:05d}.tar"
        store.download_file(key, target)
        if file_sha256(target) != self.entries[shard].sha256:
            target.unlink(missing_ok=True)
            raise DatasetError(
                f"{store.url(key)}: content differs from the index's SHA-256 (changed or "
                "damaged after preparation): prepare the dataset again"
            )
        with self._lock:
            self._downloaded[shard] = target
        return target

    def _evict(self) -> None:
        """Delete the oldest shards this process downloaded beyond cache_shards (lock held)."""
        if self.cache_shards is None:
            return
        while len(self._downloaded) > self.cache_shards:
            shard, path = self._downloaded.popitem(last=False)
            descriptor = self._files.pop(shard, None)
            if descriptor is not None:
                os.close(descriptor)
            path.unlink(missing_ok=True)
