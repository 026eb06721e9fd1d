"""In memory or streamed: the automatic choice, and the in-memory path from a prepared dataset.

A dataset is decoded into memory (uint8 [N, C, S, S], the fast path training has always
used: batches are index lookups on the device) when its decoded size N * C * S * S fits the
memory budget; otherwise it is streamed from its shards. Both paths decode the same stored
bytes with the same function (codec.decode_sample), so image i is the same tensor either way,
and with no shuffle window both visit the images in the same order.

`select_samples` applies `dataset.limit` as load_dataset does (the same seeded choice among
the source's readable items), so a limited run picks the same images on every path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data.codec import decode_sample
from selfaugment.trainer.data.folder import decode_workers
from selfaugment.trainer.data.prepared import PreparedDataset
from selfaugment.trainer.data.shard_reader import ShardReader
from selfaugment.trainer.data.stream import StreamedImages
from selfaugment.trainer.data.types import DatasetError, Images, ImageSet, LoadReport
from selfaugment.trainer.store.s3 import cache_root

logger = logging.getLogger(__name__)

#: Decoded bytes a worker may hold in memory (and on the GPU) before it streams instead: the
#: datasets the paper trains on fit (CIFAR-10 at 32 px: 0.15 GB; STL-10's 105k at 96 px:
#: 2.9 GB), ImageNet-scale ones (1.28M at 224 px: 193 GB) do not.
DEFAULT_MEMORY_BUDGET = 4 * 2**30
DataPath = Literal["auto", "memory", "stream"]
#: Largest decoded selection load_prepared keeps in the machine's cache (CIFAR-10 at 32 px:
#: 150 MiB); beyond it every process decodes again rather than fill the local disk.
DECODED_CACHE_MAX_BYTES = 1 * 2**30


def decoded_bytes(count: int, channels: int, image_size: int) -> int:
    """Bytes of `count` decoded images, uint8 [count, channels, image_size, image_size]."""
    return count * channels * image_size * image_size


def select_samples(prepared: PreparedDataset, limit: int | None, seed: int) -> np.ndarray:
    """Sample ids (sorted) that `dataset.limit` keeps: all, or the first `limit` readable
    items of the seeded shuffle of the whole source, as load_dataset picks them."""
    source_count = int(prepared.index["source_count"])
    if limit is None or limit >= source_count:
        return np.arange(prepared.count, dtype=np.int64)
    sample_of = np.full(source_count, -1, dtype=np.int64)
    sample_of[prepared.position] = np.arange(prepared.count)
    shuffled = sample_of[np.random.default_rng(seed).permutation(source_count)]
    return np.sort(shuffled[shuffled >= 0][:limit])


def decoded_cache_path(
    prepared: PreparedDataset, image_size: int, channels: int, ids: np.ndarray
) -> Path:
    """Where this machine keeps `ids` of `prepared` decoded at `image_size` (one .npy file):
    named by the prepared dataset's key and digest, the size, the channels and a digest of the
    sample ids, so a file is only ever read back for exactly the images it holds."""
    selection = hashlib.sha256(np.ascontiguousarray(ids, dtype=np.int64).tobytes()).hexdigest()
    name = f"{prepared.digest[:16]}-{image_size}px-{channels}ch-{selection[:16]}.npy"
    return cache_root() / "decoded" / prepared.key / name


def _read_decoded(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cached decoded images, or None when the file is missing, unreadable or not `shape`."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if array.dtype != np.uint8 or array.shape != shape:
        return None
    return torch.from_numpy(array)


def _write_decoded(path: Path, images: torch.Tensor) -> None:
    """Keep `images` at `path` (atomically: a reader never sees half a file); a machine whose
    cache cannot be written loses only the speed-up."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with temporary.open("wb") as handle:
            np.save(handle, images.numpy(), allow_pickle=False)
        os.replace(temporary, path)
    except OSError as error:
        logger.debug("decoded-image cache not written at %s: %s", path, error)
        temporary.unlink(missing_ok=True)


def load_prepared(
    prepared: PreparedDataset,
    image_size: int,
    channels: int,
    sample_ids: np.ndarray | None = None,
    *,
    workers: int | None = None,
    cache_dir: Path | None = None,
    keep_decoded: bool = True,
) -> ImageSet:
    """The samples (all by default) decoded into memory at `image_size`: an ImageSet, as
    load_dataset returns it. Shards are read one after another, their samples decoded by a
    thread pool (PIL and torch release the GIL).

    `keep_decoded`: when the decoded images take at most DECODED_CACHE_MAX_BYTES, keep them in
    this machine's cache (decoded_cache_path) and read them from there next time: every task
    of a local search opens the same images, and decoding them again was a large part of a
    short task's fixed cost (docs/data.md, "Disk")."""
    started = time.perf_counter()
    ids = np.arange(prepared.count) if sample_ids is None else np.asarray(sample_ids, np.int64)
    shape = (len(ids), channels, image_size, image_size)
    cached_at: Path | None = None
    images: torch.Tensor | None = None
    if keep_decoded and decoded_bytes(len(ids), channels, image_size) <= DECODED_CACHE_MAX_BYTES:
        cached_at = decoded_cache_path(prepared, image_size, channels, ids)
        images = _read_decoded(cached_at, shape)
    if images is None:
        images = _decode_all(prepared, image_size, channels, ids, workers, cache_dir)
        if cached_at is not None:
            _write_decoded(cached_at, images)
    labels = torch.from_numpy(prepared.label[ids].copy()) if prepared.has_labels else None
    image_set = ImageSet(
        images,
        labels,
        prepared.num_classes if labels is not None else None,
        prepared.names(ids),
        prepared.source,
        skipped=prepared.skipped,
    )
    image_set.report = LoadReport(
        source=prepared.source,
        format=f"prepared {prepared.index['source']['format']}",
        split=prepared.index["source"]["split"],
        num_images=len(ids),
        image_size=image_size,
        channels=channels,
        skipped=prepared.skipped,
        seconds=time.perf_counter() - started,
    )
    return image_set


def _decode_all(
    prepared: PreparedDataset,
    image_size: int,
    channels: int,
    ids: np.ndarray,
    workers: int | None,
    cache_dir: Path | None,
) -> torch.Tensor:
    """Decode the samples `ids` from their shards (the shards read in order)."""
    images = torch.empty((len(ids), channels, image_size, image_size), dtype=torch.uint8)
    reader = ShardReader(prepared, cache_dir)

    def decode(row: int) -> None:
        sample = int(ids[row])
        shard, offset = int(prepared.shard[sample]), int(prepared.offset[sample])
        data = reader.read(shard, offset, int(prepared.length[sample]))
        images[row] = decode_sample(data, prepared.kind, image_size, channels, prepared.source)

    rows_by_shard = np.argsort(prepared.shard[ids], kind="stable")
    try:
        with ThreadPoolExecutor(max_workers=workers or decode_workers()) as pool:
            list(pool.map(decode, rows_by_shard.tolist()))
    finally:
        reader.close()
    return images


def open_images(
    prepared: PreparedDataset,
    cfg: DatasetConfig,
    seed: int = 0,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    path: DataPath = "auto",
    window: int | None = None,
    cache_dir: Path | None = None,
    cache_shards: int | None = None,
) -> ImageSet | StreamedImages:
    """`cfg`'s images (image_size, channels, limit) from a prepared dataset: in memory when
    they fit `memory_budget` (or `path` says so), streamed otherwise. A training size above the
    storage size is refused when images were downscaled to it (detail would be missing)."""
    if cfg.image_size > prepared.storage_size and prepared.index["downscaled"]:
        raise DatasetError(
            f"dataset.image_size {cfg.image_size} is larger than the storage size "
            f"{prepared.storage_size} of {prepared.uri}, to which {prepared.index['downscaled']} "
            f"image(s) were downscaled: prepare it with a storage size of at least "
            f"{cfg.image_size}"
        )
    ids = select_samples(prepared, cfg.limit, seed)
    size = decoded_bytes(len(ids), cfg.channels, cfg.image_size)
    if path == "memory" or (path == "auto" and size <= memory_budget):
        return load_prepared(prepared, cfg.image_size, cfg.channels, ids, cache_dir=cache_dir)
    return StreamedImages(
        prepared, cfg.image_size, cfg.channels, ids, window, cache_dir, cache_shards
    )


def resident(images: Images | StreamedImages, budget: int, seed: int = 0) -> Images:
    """`images` decoded into memory, for a probe or the scorer that reads them many times: an
    ImageSet as it is; streamed items all when they fit `budget`, else a seeded sample of as
    many as fit (at least 2), with a warning that says so."""
    if not isinstance(images, StreamedImages):
        return images
    size = images.image_size
    if size is None:
        raise DatasetError(f"{images.source}: images held in memory need an image size")
    each = decoded_bytes(1, images.channels, size)
    if each * len(images) <= budget:
        return images.in_memory()
    keep = min(len(images), max(2, budget // each))
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), keep, replace=False))
    logger.warning(
        "%s: %d of %d images (a seeded sample) held in memory: all would take %.1f MB, more "
        "than the %.1f MB of dataset.memory_budget given to them",
        images.source,
        keep,
        len(images),
        each * len(images) / 1e6,
        budget / 1e6,
    )
    return images.subset(chosen).in_memory()
