"""A dataset source as a list of items to prepare: names, labels, classes, and a reader per item.

Image folders are read file by file, locally or straight from an s3:// prefix through the
artifact store (the same client, endpoint and credentials as the run's store; nothing is
downloaded in bulk first). Array sources (IDX, .npz, CIFAR-10, SVHN, STL-10, digits) come
through the existing readers, which hold them in memory: they are small images.

`identity` is what names the source's content in a prepared dataset's key: the uri, format
and split, plus the file names and sizes (local folders), the file names (S3 prefixes: a
listing carries no sizes), or a digest of the pixels and labels (arrays).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data.codec import ARRAY, ENCODED, SampleKind
from selfaugment.trainer.data.convert import array_to_nchw
from selfaugment.trainer.data.datasets import read_arrays, resolve_source
from selfaugment.trainer.data.folder import IMAGE_SUFFIXES, is_image_file, list_folder
from selfaugment.trainer.data.remote import is_s3_uri
from selfaugment.trainer.data.types import DatasetError
from selfaugment.trainer.store import open_store

# Names in an S3 prefix that mean "not an image folder": read by the array readers instead.
ARRAY_MARKERS = ("-ubyte", ".npz", "cifar-10-batches-py/", ".mat", "stl10_binary/")


@dataclass
class SourceItems:
    """The items of a source in a fixed order; `read(i)` gives item i's file bytes ("encoded")
    or its uint8 [C, H, W] pixels ("array"). A local file that cannot be read raises OSError
    (reported as unreadable, as load_dataset does); a store that cannot be reached raises
    StoreError (the preparation stops and a rerun resumes)."""

    uri: str
    format: str
    split: str
    kind: SampleKind
    names: list[str]
    labels: list[int] | None
    classes: list[str] | None
    num_classes: int | None
    identity: dict[str, Any]
    read: Callable[[int], bytes | np.ndarray]

    def __len__(self) -> int:
        return len(self.names)

    def suffix(self, position: int) -> str:
        """The file suffix of item `position` (".npy" for arrays)."""
        return PurePosixPath(self.names[position]).suffix.lower() if self.kind == ENCODED else ""


def _digest(lines: list[str]) -> str:
    hasher = hashlib.sha256()
    for line in lines:
        hasher.update(line.encode())
        hasher.update(b"\n")
    return hasher.hexdigest()


def folder_layout(names: list[str]) -> tuple[list[str], list[int] | None, list[str] | None]:
    """(names in reading order, labels, classes) of image names relative to a folder, by
    list_folder's rules: loose images at the top mean no labels; otherwise each top-level
    folder with images is a class (sorted), its images below it in sorted order."""
    images = sorted(
        name
        for name in names
        if is_image_file(Path(name)) and not any(part.startswith(".") for part in name.split("/"))
    )
    if any("/" not in name for name in images):
        return images, None, None
    classes = sorted({name.split("/", 1)[0] for name in images})
    label_of = {name: label for label, name in enumerate(classes)}
    ordered = sorted(images, key=lambda name: (label_of[name.split("/", 1)[0]], name))
    labels = [label_of[name.split("/", 1)[0]] for name in ordered]
    return ordered, labels, classes


def _local_folder(cfg: DatasetConfig, fmt: str, root: Path) -> SourceItems:
    if not root.is_dir():
        raise DatasetError(f"dataset.uri: {root} is not a folder (format imagefolder)")
    listing = list_folder(root)
    files = listing.files
    if not files:
        raise DatasetError(
            f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below"
        )
    names = [path.relative_to(root).as_posix() for path in files]
    sizes = [path.stat().st_size for path in files]
    identity = {
        "uri": str(root.resolve()),
        "format": fmt,
        "split": cfg.split,
        "files": _digest([f"{name}\t{size}" for name, size in zip(names, sizes, strict=True)]),
    }
    classes = listing.classes
    return SourceItems(
        str(root.resolve()),
        fmt,
        cfg.split,
        ENCODED,
        names,
        listing.labels,
        classes,
        len(classes) if classes is not None else None,
        identity,
        lambda position: files[position].read_bytes(),
    )


def _s3_folder(cfg: DatasetConfig, keys: list[str], store: Any) -> SourceItems:
    names, labels, classes = folder_layout(keys)
    identity = {"uri": cfg.uri.rstrip("/"), "format": "imagefolder", "split": cfg.split}
    identity["files"] = _digest(names)
    return SourceItems(
        cfg.uri.rstrip("/"),
        "imagefolder",
        cfg.split,
        ENCODED,
        names,
        labels,
        classes,
        len(classes) if classes is not None else None,
        identity,
        lambda position: store.read_bytes(names[position]),
    )


def _arrays(cfg: DatasetConfig, fmt: str, local: Path | None) -> SourceItems:
    data = read_arrays(fmt, local, cfg)
    if len(data.images) == 0:
        raise DatasetError(f"{cfg.uri}: the dataset holds no images")
    pixels = array_to_nchw(data.images, cfg.uri)
    hasher = hashlib.sha256(str(pixels.shape).encode())
    hasher.update(pixels.data)  # contiguous: hashed in place
    if data.labels is not None:
        hasher.update(np.ascontiguousarray(data.labels, dtype=np.int64).tobytes())
    identity = {"uri": cfg.uri, "format": fmt, "split": cfg.split, "arrays": hasher.hexdigest()}
    labels = None if data.labels is None else [int(label) for label in data.labels]
    names = [f"{data.name_prefix}#{index}" for index in range(len(pixels))]
    return SourceItems(
        cfg.uri,
        fmt,
        cfg.split,
        ARRAY,
        names,
        labels,
        None,
        data.num_classes if labels is not None else None,
        identity,
        lambda position: pixels[position],
    )


def _s3_image_keys(cfg: DatasetConfig) -> tuple[list[str], Any] | None:
    """The keys under an s3:// prefix when it is an image folder (else None: arrays)."""
    if cfg.format not in ("auto", "imagefolder"):
        return None
    store = open_store(cfg.uri.rstrip("/"))
    keys = store.list()
    if not keys or (cfg.format == "auto" and any(m in k for k in keys for m in ARRAY_MARKERS)):
        return None
    return keys, store


def open_source(cfg: DatasetConfig) -> SourceItems:
    """The items of `cfg`'s source (uri, format, split, root, download); image_size, channels
    and limit do not matter here: a prepared dataset holds the whole source."""
    if is_s3_uri(cfg.uri):
        found = _s3_image_keys(cfg)
        if found is not None:
            keys, store = found
            if not folder_layout(keys)[0]:
                raise DatasetError(
                    f"{cfg.uri}: no image files ({', '.join(IMAGE_SUFFIXES)}) under this prefix"
                )
            return _s3_folder(cfg, keys, store)
    fmt, local = resolve_source(cfg)
    if fmt == "imagefolder":
        if local is None:
            raise DatasetError(f"dataset.uri: format 'imagefolder' needs a folder, got {cfg.uri}")
        return _local_folder(cfg, fmt, local)
    return _arrays(cfg, fmt, local)
