"""IDX files (the MNIST / Fashion-MNIST format), plain or gzip-compressed.

Format (LeCun et al., http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code
(0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of
dimensions, one big-endian uint32 per dimension, then the values big-endian in C order.
"""

from __future__ import annotations

import gzip
import re
import struct
import zlib
from pathlib import Path

import numpy as np

from selfaugment.trainer.data.types import ArrayData, DatasetError, check_labels

IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
GZIP_MAGIC = b"\x1f\x8b"
# Matches names like train-images-idx3-ubyte, t10k-labels-idx1-ubyte.gz, foo.idx3-ubyte.
IDX_NAME = re.compile(r"idx\d-ubyte(\.gz)?$")
SPLIT_PREFIX = {"train": "train", "test": "t10k"}


def is_idx_name(path: Path) -> bool:
    """True for file names in the MNIST style (`...idx3-ubyte`, optionally `.gz`)."""
    return bool(IDX_NAME.search(path.name))


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read IDX file: {error.strerror}") from None
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path}: broken or truncated gzip data: {error}") from None


def read_idx(path: Path) -> np.ndarray:
    """Parse one IDX file into a native-endian array, validating header and size."""
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in IDX_DTYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000 followed by a "
            f"type code among {', '.join(f'0x{code:02x}' for code in IDX_DTYPES)})"
        )
    if ndim == 0:
        raise DatasetError(f"{path}: IDX header declares 0 dimensions")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise DatasetError(f"{path}: truncated IDX header (needs {header_size} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_size
    if actual < expected:
        raise DatasetError(
            f"{path}: truncated IDX data: shape {dims} needs {expected} bytes, found {actual}"
        )
    if actual > expected:
        raise DatasetError(
            f"{path}: {actual - expected} unexpected bytes after the IDX data of shape {dims}"
        )
    array = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(dims)
    return array.astype(dtype.newbyteorder("="), copy=False)


def _find(directory: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def idx_files(path: Path, split: str) -> tuple[Path, Path | None]:
    """(images file, labels file or None) for a directory and split, or a single images file."""
    if path.is_file():
        labels_name = path.name.replace("images-idx3", "labels-idx1")
        labels = path.with_name(labels_name)
        return path, labels if labels_name != path.name and labels.is_file() else None
    prefix = SPLIT_PREFIX[split]
    images = _find(path, f"{prefix}-images-idx3-ubyte")
    if images is None:
        raise DatasetError(
            f"{path}: no {prefix}-images-idx3-ubyte[.gz] for split {split!r} in this directory"
        )
    return images, _find(path, f"{prefix}-labels-idx1-ubyte")


def has_idx_files(directory: Path) -> bool:
    """True when a directory holds MNIST-style image files for some split."""
    return any(_find(directory, f"{p}-images-idx3-ubyte") for p in SPLIT_PREFIX.values())


def load_idx(path: Path, split: str) -> ArrayData:
    """Images (and labels when their file is present) from an IDX directory or file."""
    images_path, labels_path = idx_files(path, split)
    images = read_idx(images_path)
    if images.ndim not in (3, 4):
        raise DatasetError(
            f"{images_path}: expected image data of shape [N, H, W] or [N, H, W, C], "
            f"got {images.shape}"
        )
    labels = None
    num_classes = None
    if labels_path is not None:
        labels = check_labels(read_idx(labels_path), str(labels_path))
        if len(labels) != len(images):
            raise DatasetError(
                f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}"
            )
        num_classes = int(labels.max()) + 1 if len(labels) else None
    return ArrayData(images, labels, num_classes, images_path.name)
