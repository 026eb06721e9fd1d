"""Prepare a dataset once: its source turned into shards in an artifact store, with an index.

`prepare_dataset(cfg, store, storage_size)` reads every item of `cfg`'s source once, checks
that it decodes, stores it at the storage resolution (codec.py says how), and writes shards
of `shard_size` source items. The prepared dataset is keyed by a digest of the source's
identity and of these settings, so every later task, search or Pretrain on the same source
with the same settings finds it and reuses it; the second call returns at once.

Preparation resumes: shard k holds source items [k * shard_size, (k + 1) * shard_size), a
fixed range, so a rerun skips every shard whose table exists and builds only the rest; the
index is written last. Two preparers racing on the same key write the same bytes (shards
are deterministic; every write is atomic), so the race wastes work but never corrupts.

Unreadable files follow `dataset.on_corrupt`: 'skip' leaves them out and names them in the
index (count and names), 'fail' stops at the first with CorruptImageError.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, ValidationError

from selfaugment.trainer.config import DatasetConfig, StrictModel
from selfaugment.trainer.data.codec import Stored, encode_array, encode_file
from selfaugment.trainer.data.folder import decode_workers
from selfaugment.trainer.data.prepared import (
    NO_LABEL,
    PREPARED_KIND,
    PREPARED_SCHEMA_VERSION,
    PreparedDataset,
    PrepareReport,
    index_key,
    open_prepared,
    samples_key,
    shard_table_key,
    shard_tar_key,
)
from selfaugment.trainer.data.shards import ShardTable, ShardWriter
from selfaugment.trainer.data.sources import SourceItems, open_source
from selfaugment.trainer.data.types import CorruptImageError, DatasetError
from selfaugment.trainer.store import ArtifactStore

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
_BUFFER_NAME = re.compile(r"<_io\.BytesIO object at 0x[0-9a-f]+>")


class PrepareSettings(StrictModel):
    """How a source is stored; every field is part of the prepared dataset's key."""

    storage_size: int = Field(
        256,
        ge=8,
        le=4096,
        description=(
            "Images whose shorter side is larger are downscaled to it (aspect kept) and "
            "re-encoded; smaller ones are stored as they are. Choose it at least as large as "
            "every training size (and larger where crops should see the source's detail)."
        ),
    )
    shard_size: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Source items per shard (roughly 40 MB at 256 px JPEG).",
    )
    encoding: Literal["jpeg", "png"] = Field(
        "jpeg", description="Format of re-encoded (downscaled) images; png is lossless."
    )
    jpeg_quality: int = Field(95, ge=50, le=100, description="JPEG quality of re-encoded images.")


def prepare_settings(**fields: object) -> PrepareSettings:
    """PrepareSettings, or a DatasetError naming the field that is out of range."""
    try:
        return PrepareSettings.model_validate(fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise DatasetError(f"prepare: {where}: {first['msg']}") from None


def _slug(source: SourceItems) -> str:
    """A readable name for the key: the source's last path part and its split."""
    tail = source.uri.rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    words = re.sub(r"[^a-z0-9]+", "-", tail.lower()).strip("-")[:40] or "dataset"
    return f"{words}-{source.split}"


def prepared_key(source: SourceItems, settings: PrepareSettings) -> str:
    """`<name>-<digest>`: the same source with the same settings gets the same key."""
    identity = {
        "schema_version": PREPARED_SCHEMA_VERSION,
        "source": source.identity,
        "settings": settings.model_dump(mode="json"),
    }
    text = json.dumps(identity, sort_keys=True)
    return f"{_slug(source)}-{hashlib.sha256(text.encode()).hexdigest()[:20]}"


def _reason(error: Exception) -> str:
    message = _BUFFER_NAME.sub("", str(error)).strip(" :'\"") or "unreadable"
    return f"{type(error).__name__}: {message}"


def _encode_item(source: SourceItems, settings: PrepareSettings, position: int) -> Stored | str:
    """The item as stored, or the reason it is unreadable."""
    try:
        payload = source.read(position)
    except OSError as error:
        return _reason(error)
    if isinstance(payload, np.ndarray):
        return encode_array(payload, settings.storage_size)
    try:
        return encode_file(
            payload,
            source.suffix(position),
            settings.storage_size,
            settings.encoding,
            settings.jpeg_quality,
        )
    except Exception as error:  # any decoder failure marks this file unreadable, never raised raw
        return _reason(error)


def _build_shard(
    source: SourceItems,
    settings: PrepareSettings,
    store: ArtifactStore,
    key: str,
    shard: int,
    on_corrupt: str,
    pool: ThreadPoolExecutor,
) -> ShardTable:
    first = shard * settings.shard_size
    positions = range(first, min(first + settings.shard_size, len(source)))
    with tempfile.TemporaryDirectory(prefix="selfaugment-shard-") as folder:
        path = Path(folder) / "shard.tar"
        with ShardWriter(path) as writer:
            results = pool.map(lambda item: _encode_item(source, settings, item), positions)
            for position, result in zip(positions, results, strict=True):
                name = source.names[position]
                if isinstance(result, str):
                    if on_corrupt == "fail":
                        raise CorruptImageError(f"{source.uri}/{name}", result)
                    writer.table.skipped.append((name, result))
                    continue
                label = NO_LABEL if source.labels is None else source.labels[position]
                writer.add(f"{position:09d}{result.suffix}", result.data, name, position, label)
                writer.table.downscaled += result.downscaled
            table = writer.close()
        store.upload_file(path, shard_tar_key(key, shard))
    store.write_json(shard_table_key(key, shard), table.to_json())
    return table


def _digest(tables: list[ShardTable], labels: np.ndarray, classes: list[str] | None) -> str:
    """SHA-256 over the shards' SHA-256s, the labels and the class names: equal digests mean
    equal training data."""
    hasher = hashlib.sha256()
    for table in tables:
        hasher.update(table.sha256.encode())
    hasher.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    hasher.update(repr(classes).encode())
    return hasher.hexdigest()


def _finish(
    source: SourceItems, settings: PrepareSettings, store: ArtifactStore, key: str, shards: int
) -> None:
    """Write samples.npz, then index.json (last: the dataset is complete)."""
    tables = [ShardTable.from_json(store.read_json(shard_table_key(key, s))) for s in range(shards)]
    count = sum(table.count for table in tables)
    skipped = [item for table in tables for item in table.skipped]
    if count == 0:
        shown = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
        raise DatasetError(f"{source.uri}: none of the {len(source)} items could be read ({shown})")
    arrays: dict[str, np.ndarray] = {
        "shard": np.repeat(np.arange(shards, dtype=np.int32), [t.count for t in tables]),
        "offset": np.array([v for t in tables for v in t.offsets], dtype=np.int64),
        "length": np.array([v for t in tables for v in t.lengths], dtype=np.int64),
        "label": np.array([v for t in tables for v in t.labels], dtype=np.int64),
        "position": np.array([v for t in tables for v in t.positions], dtype=np.int64),
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        shard=arrays["shard"],
        offset=arrays["offset"],
        length=arrays["length"],
        label=arrays["label"],
        position=arrays["position"],
    )
    store.write_bytes(samples_key(key), buffer.getvalue())
    index = {
        "schema_version": PREPARED_SCHEMA_VERSION,
        "kind": PREPARED_KIND,
        "key": key,
        "source": {"uri": source.uri, "format": source.format, "split": source.split},
        "identity": source.identity,
        "settings": settings.model_dump(mode="json"),
        "sample_kind": source.kind,
        "storage_size": settings.storage_size,
        "count": count,
        "source_count": len(source),
        "labelled": source.labels is not None,
        "classes": source.classes,
        "num_classes": source.num_classes,
        "shards": [{"count": t.count, "bytes": t.bytes, "sha256": t.sha256} for t in tables],
        "skipped": {"count": len(skipped), "files": [list(item) for item in skipped]},
        "downscaled": sum(table.downscaled for table in tables),
        "digest": _digest(tables, arrays["label"], source.classes),
    }
    store.write_json(index_key(key), index)


def prepare_dataset(
    cfg: DatasetConfig,
    store: ArtifactStore,
    storage_size: int = 256,
    *,
    shard_size: int = 1024,
    encoding: Literal["jpeg", "png"] = "jpeg",
    jpeg_quality: int = 95,
    workers: int | None = None,
    progress: ProgressCallback | None = None,
) -> PreparedDataset:
    """Prepare `cfg`'s source into `store` (or find it prepared there) and open it.

    `store` holds prepared datasets side by side (each under its key), so give every task and
    search the same one. `report` on the result says whether anything was built."""
    started = time.perf_counter()
    settings = prepare_settings(
        storage_size=storage_size,
        shard_size=shard_size,
        encoding=encoding,
        jpeg_quality=jpeg_quality,
    )
    source = open_source(cfg)
    key = prepared_key(source, settings)
    if store.exists(index_key(key)):
        prepared = open_prepared(store, key)
        prepared.report = PrepareReport(reused=True, seconds=time.perf_counter() - started)
        logger.info("reusing %s", prepared.summary())
        return prepared
    shards = -(-len(source) // settings.shard_size)
    report = PrepareReport(reused=False)
    pool = ThreadPoolExecutor(max_workers=workers or decode_workers())
    try:
        for shard in range(shards):
            if store.exists(shard_table_key(key, shard)):
                report.shards_kept += 1
            else:
                shard_started = time.perf_counter()
                table = _build_shard(source, settings, store, key, shard, cfg.on_corrupt, pool)
                report.shards_built += 1
                logger.info(
                    "%s: shard %d/%d, %d images (%d unreadable), %.1f MB in %.1fs",
                    key,
                    shard + 1,
                    shards,
                    table.count,
                    len(table.skipped),
                    table.bytes / 1e6,
                    time.perf_counter() - shard_started,
                )
            if progress is not None:
                progress(shard + 1, shards)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    _finish(source, settings, store, key, shards)
    prepared = open_prepared(store, key)
    report.seconds = time.perf_counter() - started
    prepared.report = report
    logger.info("prepared %s in %.1fs", prepared.summary(), report.seconds)
    return prepared


def prepared_for_rank(
    cfg: DatasetConfig,
    store: ArtifactStore,
    storage_size: int = 256,
    *,
    main: bool = True,
    poll_seconds: float = 2.0,
    timeout_seconds: float | None = None,
) -> PreparedDataset:
    """For a group of processes training together: the main one prepares (prepare_dataset),
    the others wait until its index exists in `store` and open it (one store check every
    `poll_seconds`; a DatasetError after `timeout_seconds`, None: wait as long as it takes,
    which a Job's deadline bounds)."""
    if main:
        return prepare_dataset(cfg, store, storage_size)
    key = prepared_key(open_source(cfg), prepare_settings(storage_size=storage_size))
    started = time.monotonic()
    while not store.exists(index_key(key)):
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise DatasetError(
                f"{store.url(index_key(key))} did not appear within {timeout_seconds:.0f} s: "
                "the main process did not finish preparing the dataset"
            )
        time.sleep(poll_seconds)
    return open_prepared(store, key)
