"""A prepared dataset in an artifact store: its keys, its index, and the per-sample table.

Layout under `<key>/` in the store (the key is `<name>-<digest of source and settings>`):

    shards/00000.tar     the samples (see shards.py)
    shards/00000.json    that shard's table; written after the tar: the shard is finished
    samples.npz          per sample: shard, byte offset, length, label, source position
    index.json           count, classes, storage size, shards, skipped files, digest;
                         written last: its existence means the dataset is complete

The reader loads index.json and samples.npz only (about 30 bytes per sample, read in
milliseconds), so opening a prepared dataset costs the same at 10k and at 1M images.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from selfaugment.trainer.data.codec import SampleKind
from selfaugment.trainer.data.shards import ShardTable
from selfaugment.trainer.data.types import DatasetError
from selfaugment.trainer.store import ArtifactNotFoundError, ArtifactStore, open_store

PREPARED_SCHEMA_VERSION = 1
PREPARED_KIND = "selfaugment/prepared-dataset"
INDEX_NAME = "index.json"
SAMPLES_NAME = "samples.npz"
NO_LABEL = -1
SAMPLE_ARRAYS = ("shard", "offset", "length", "label", "position")


def index_key(key: str) -> str:
    return f"{key}/{INDEX_NAME}"


def samples_key(key: str) -> str:
    return f"{key}/{SAMPLES_NAME}"


def shard_tar_key(key: str, shard: int) -> str:
    return f"{key}/shards/{shard:05d}.tar"


def shard_table_key(key: str, shard: int) -> str:
    return f"{key}/shards/{shard:05d}.json"


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the index lists it."""

    count: int
    bytes: int
    sha256: str


@dataclass
class PrepareReport:
    """What one `prepare_dataset` call did."""

    reused: bool
    shards_built: int = 0
    shards_kept: int = 0
    seconds: float = 0.0


@dataclass
class PreparedDataset:
    """An opened prepared dataset: the index, and per sample where its bytes are and its label.

    Sample i (0 <= i < count) is the i-th readable item of the source, in source order."""

    store: ArtifactStore
    key: str
    index: dict[str, Any]
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    label: np.ndarray
    position: np.ndarray
    report: PrepareReport | None = None
    _tables: dict[int, ShardTable] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def uri(self) -> str:
        """Where it is: store URI and key (what a task result records)."""
        return self.store.url(self.key)

    @property
    def count(self) -> int:
        return int(self.index["count"])

    @property
    def kind(self) -> SampleKind:
        kind: SampleKind = self.index["sample_kind"]
        return kind

    @property
    def storage_size(self) -> int:
        return int(self.index["storage_size"])

    @property
    def source(self) -> str:
        return str(self.index["source"]["uri"])

    @property
    def classes(self) -> list[str] | None:
        classes = self.index.get("classes")
        return None if classes is None else list(classes)

    @property
    def num_classes(self) -> int | None:
        value = self.index.get("num_classes")
        return None if value is None else int(value)

    @property
    def has_labels(self) -> bool:
        return bool(self.index["labelled"])

    @property
    def skipped(self) -> list[tuple[str, str]]:
        return [(str(name), str(reason)) for name, reason in self.index["skipped"]["files"]]

    @property
    def digest(self) -> str:
        return str(self.index["digest"])

    @property
    def shards(self) -> list[ShardEntry]:
        return [
            ShardEntry(int(s["count"]), int(s["bytes"]), s["sha256"]) for s in self.index["shards"]
        ]

    def table(self, shard: int) -> ShardTable:
        """A shard's table (names and all), read once per process."""
        with self._lock:
            if shard not in self._tables:
                data = self.store.read_json(shard_table_key(self.key, shard))
                self._tables[shard] = ShardTable.from_json(data)
            return self._tables[shard]

    def names(self, samples: np.ndarray | list[int]) -> list[str]:
        """The source names (relative file paths, or '<array>#i') of these samples."""
        starts = np.concatenate([[0], np.cumsum([s.count for s in self.shards])])
        result = []
        for sample in np.asarray(samples, dtype=np.int64).tolist():
            shard = int(self.shard[sample])
            result.append(self.table(shard).names[sample - int(starts[shard])])
        return result

    def summary(self) -> str:
        """One line for logs and the CLI."""
        text = (
            f"{self.uri}: {self.count} images ({self.kind}, storage size {self.storage_size}) "
            f"in {len(self.index['shards'])} shard(s) from {self.source}"
        )
        if self.skipped:
            text += f", {len(self.skipped)} unreadable file(s) skipped"
        return text


def _samples_from(data: bytes, where: str) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            return {name: archive[name] for name in SAMPLE_ARRAYS}
    except (OSError, ValueError, KeyError) as error:
        raise DatasetError(f"{where}: not a readable sample table: {error}") from None


def open_prepared(store: ArtifactStore, key: str) -> PreparedDataset:
    """The prepared dataset `key` in `store`; DatasetError when it is not (completely) there."""
    try:
        index = store.read_json(index_key(key))
    except ArtifactNotFoundError:
        raise DatasetError(
            f"{store.url(key)}: no prepared dataset here (no {INDEX_NAME}: not prepared, or "
            "its preparation did not finish; run `selfaugment data prepare` again)"
        ) from None
    if index.get("kind") != PREPARED_KIND:
        raise DatasetError(f"{store.url(index_key(key))}: not a prepared-dataset index")
    if index.get("schema_version") != PREPARED_SCHEMA_VERSION:
        raise DatasetError(
            f"{store.url(index_key(key))}: schema version {index.get('schema_version')}, this "
            f"version of selfaugment reads {PREPARED_SCHEMA_VERSION}: prepare the dataset again"
        )
    arrays = _samples_from(store.read_bytes(samples_key(key)), store.url(samples_key(key)))
    if len(arrays["shard"]) != int(index["count"]):
        raise DatasetError(
            f"{store.url(samples_key(key))}: {len(arrays['shard'])} samples, the index says "
            f"{index['count']}"
        )
    return PreparedDataset(
        store,
        key,
        index,
        shard=arrays["shard"],
        offset=arrays["offset"],
        length=arrays["length"],
        label=arrays["label"],
        position=arrays["position"],
    )


def open_prepared_uri(uri: str, endpoint: str | None = None) -> PreparedDataset:
    """A prepared dataset by its URI (`PreparedDataset.uri`: a folder or s3://.../<key>)."""
    parent, _, key = uri.rstrip("/").rpartition("/")
    if not parent or not key:
        raise DatasetError(f"{uri!r} does not name a prepared dataset (expected STORE/KEY)")
    return open_prepared(open_store(parent, endpoint=endpoint), key)
