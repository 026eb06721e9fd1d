"""Datasets as decoded uint8 tensors in memory, from every supported source, plus splits.

`load_dataset(cfg, seed)` reads `cfg.uri` ('sklearn:digits', 'torchvision:cifar10|svhn|stl10',
a local path or an s3:// uri), keeps `cfg.limit` images chosen by a seeded shuffle (in source
order), converts them to `cfg.channels` and resizes them to `cfg.image_size` (shorter side, then
centre crop). Unreadable image files are skipped and reported, or stop the load, per
`cfg.on_corrupt`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data.arrays import load_digits_data, load_npz
from selfaugment.trainer.data.convert import prepare_images
from selfaugment.trainer.data.folder import decode_folder, list_folder
from selfaugment.trainer.data.idx import has_idx_files, is_idx_name, load_idx
from selfaugment.trainer.data.remote import fetch_s3, is_s3_uri
from selfaugment.trainer.data.torchvision_files import CIFAR_FOLDER, LOADERS
from selfaugment.trainer.data.types import (
    ArrayData,
    DatasetError,
    ImageSet,
    LoadReport,
)
from selfaugment.trainer.store.s3 import cache_root

logger = logging.getLogger(__name__)

DIGITS_URI = "sklearn:digits"
TORCHVISION_SCHEME = "torchvision:"
FILE_SCHEME = "file://"
SKIPPED_SHOWN = 20


def infer_format(path: Path) -> str:
    """Format of a local file or folder: .npz, IDX file/folder, CIFAR-10 folder or image folder."""
    if path.is_dir():
        if has_idx_files(path):
            return "idx"
        if path.name == CIFAR_FOLDER or (path / CIFAR_FOLDER).is_dir():
            return "cifar10"
        return "imagefolder"
    if path.suffix.lower() == ".npz":
        return "npz"
    if is_idx_name(path):
        return "idx"
    raise DatasetError(
        f"dataset.uri: cannot infer the format of {path} (expected a folder, a .npz file or an "
        "IDX file named like train-images-idx3-ubyte[.gz]); set dataset.format"
    )


def _builtin_source(cfg: DatasetConfig) -> tuple[str, Path | None]:
    """(format, local root) for 'sklearn:' and 'torchvision:' uris."""
    if cfg.uri.startswith(TORCHVISION_SCHEME):
        name = cfg.uri[len(TORCHVISION_SCHEME) :]
        if name not in LOADERS:
            raise DatasetError(
                f"dataset.uri: unknown torchvision dataset {name!r} "
                f"(supported: {', '.join(sorted(LOADERS))})"
            )
        if cfg.format not in ("auto", name):
            raise DatasetError(f"dataset.format: {cfg.format!r} conflicts with uri {cfg.uri!r}")
        if cfg.root is not None:
            return name, Path(cfg.root).expanduser()
        if cfg.download:
            return name, cache_root() / "torchvision"
        raise DatasetError(
            f"dataset.root is not set: {cfg.uri} is read from the folder in dataset.root; "
            "set it, or set dataset.download: true to download into the cache"
        )
    if cfg.uri != DIGITS_URI:
        raise DatasetError(f"dataset.uri: unknown built-in source {cfg.uri!r} (try {DIGITS_URI})")
    if cfg.format not in ("auto", "digits"):
        raise DatasetError(f"dataset.format: {cfg.format!r} conflicts with uri {cfg.uri!r}")
    return "digits", None


def resolve_source(cfg: DatasetConfig) -> tuple[str, Path | None]:
    """(format, local path) for a config: built-ins, s3:// (downloaded to the cache), paths."""
    if cfg.uri.startswith(TORCHVISION_SCHEME) or cfg.uri.startswith("sklearn:"):
        return _builtin_source(cfg)
    if cfg.format == "digits":
        raise DatasetError(f"dataset.format: 'digits' needs uri {DIGITS_URI!r}, got {cfg.uri!r}")
    if is_s3_uri(cfg.uri):
        local = fetch_s3(cfg.uri)
    else:
        local = Path(cfg.uri.removeprefix(FILE_SCHEME)).expanduser()
    if not local.exists():
        raise DatasetError(f"dataset.uri: no such file or folder: {local}")
    return (infer_format(local) if cfg.format == "auto" else cfg.format), local


def _chosen_indices(count: int, limit: int | None, seed: int) -> np.ndarray:
    """All indices, or `limit` of them picked by a seeded shuffle, returned in source order."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).permutation(count)[:limit])


def read_arrays(fmt: str, local: Path | None, cfg: DatasetConfig) -> ArrayData:
    """The undecoded pixels and labels of an array source (every format but imagefolder)."""
    if fmt == "digits":
        return load_digits_data(cfg.split)
    if local is None:
        raise DatasetError(f"dataset.uri: format {fmt!r} needs a path")
    if fmt == "npz":
        if cfg.split != "train":
            raise DatasetError(f"dataset.split: {local} is one .npz file; use split 'train'")
        return load_npz(local)
    if fmt == "idx":
        return load_idx(local, cfg.split)
    return LOADERS[fmt](local, cfg.split, cfg.download)


def _from_arrays(data: ArrayData, cfg: DatasetConfig, seed: int) -> ImageSet:
    if len(data.images) == 0:
        raise DatasetError(f"{cfg.uri}: the dataset holds no images")
    chosen = _chosen_indices(len(data.images), cfg.limit, seed)
    selected = data.images if len(chosen) == len(data.images) else data.images[chosen]
    images = prepare_images(selected, cfg.image_size, cfg.channels, f"{cfg.uri}")
    labels = None if data.labels is None else torch.from_numpy(data.labels[chosen].copy())
    names = [f"{data.name_prefix}#{index}" for index in chosen.tolist()]
    return ImageSet(
        images, labels, data.num_classes if labels is not None else None, names, cfg.uri
    )


def _from_folder(local: Path, cfg: DatasetConfig, seed: int) -> ImageSet:
    if cfg.split != "train":
        raise DatasetError(
            f"dataset.split: {local} is an image folder with no splits; use split 'train' "
            "and point dataset.uri at the test folder for a test set"
        )
    listing = list_folder(local)
    images, kept, skipped = decode_folder(
        local, listing, cfg.image_size, cfg.channels, cfg.limit, seed, cfg.on_corrupt
    )
    labels = None
    if listing.labels is not None:
        labels = torch.tensor([listing.labels[i] for i in kept], dtype=torch.int64)
    names = [listing.files[i].relative_to(local).as_posix() for i in kept]
    num_classes = len(listing.classes) if listing.classes is not None else None
    return ImageSet(images, labels, num_classes, names, cfg.uri, skipped=skipped)


def load_dataset(cfg: DatasetConfig, seed: int = 0) -> ImageSet:
    """Decoded images (uint8 [N, channels, size, size]) and labels where the source has them."""
    start = time.perf_counter()
    fmt, local = resolve_source(cfg)
    if fmt == "imagefolder":
        if local is None:
            raise DatasetError(f"dataset.uri: format 'imagefolder' needs a folder, got {cfg.uri}")
        if not local.is_dir():
            raise DatasetError(f"dataset.uri: {local} is not a folder (format imagefolder)")
        image_set = _from_folder(local, cfg, seed)
    else:
        image_set = _from_arrays(read_arrays(fmt, local, cfg), cfg, seed)
    if image_set.skipped:
        shown = ", ".join(
            f"{name} ({reason})" for name, reason in image_set.skipped[:SKIPPED_SHOWN]
        )
        more = len(image_set.skipped) - SKIPPED_SHOWN
        logger.warning(
            "%s: skipped %d unreadable image(s): %s%s",
            cfg.uri,
            len(image_set.skipped),
            shown,
            f" and {more} more" if more > 0 else "",
        )
    image_set.report = LoadReport(
        source=cfg.uri,
        format=fmt,
        split=cfg.split,
        num_images=len(image_set),
        image_size=cfg.image_size,
        channels=cfg.channels,
        skipped=image_set.skipped,
        seconds=time.perf_counter() - start,
    )
    logger.info("loaded %s", image_set.report.summary())
    return image_set
