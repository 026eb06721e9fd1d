"""Image folders: class-per-subfolder (labelled, ImageFolder convention) or flat (unlabelled).

Files are decoded by a thread pool: PIL and torch release the GIL while decoding and resizing.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from selfaugment.trainer.data.convert import resize_and_crop
from selfaugment.trainer.data.types import CorruptImageError, DatasetError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# PIL modes holding 16/32-bit integer gray levels; scaled from 0..65535 to 0..255.
WIDE_GRAY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
WIDE_GRAY_SCALE = 257.0


def decode_workers() -> int:
    """Threads for decoding: a few per core, capped (decoding is I/O plus GIL-free C code)."""
    return min(16, 2 * (os.cpu_count() or 1))


@dataclass
class FolderListing:
    """Image files under a folder, with class labels when it has class subfolders."""

    files: list[Path]
    labels: list[int] | None
    classes: list[str] | None


def is_image_file(path: Path) -> bool:
    """An image by its suffix, and not hidden (the rule for folders and for S3 keys alike)."""
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_under(folder: Path) -> list[Path]:
    found: list[Path] = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        found.extend(Path(directory) / name for name in names if is_image_file(Path(name)))
    return sorted(found, key=lambda path: path.relative_to(folder).as_posix())


def list_folder(root: Path) -> FolderListing:
    """Sorted image files; subfolders of `root` are classes unless `root` has loose images."""
    try:
        entries = sorted(root.iterdir())
    except OSError as error:
        raise DatasetError(f"{root}: cannot list image folder: {error.strerror}") from None
    loose = [entry for entry in entries if entry.is_file() and is_image_file(entry)]
    subdirs = [entry for entry in entries if entry.is_dir() and not entry.name.startswith(".")]
    if loose:
        if subdirs:
            logger.warning(
                "%s has images next to subfolders: reading all images without class labels", root
            )
        return FolderListing(_images_under(root), None, None)
    files: list[Path] = []
    labels: list[int] = []
    classes: list[str] = []
    for directory in subdirs:
        images = _images_under(directory)
        if images:
            labels.extend([len(classes)] * len(images))
            classes.append(directory.name)
            files.extend(images)
    return FolderListing(files, labels, classes)


def image_pixels(image: Image.Image, channels: int) -> np.ndarray:
    """Loaded PIL image to uint8 [H, W] (gray) or [H, W, 3]."""
    if image.mode in WIDE_GRAY_MODES:
        wide = np.asarray(image, dtype=np.float64) / WIDE_GRAY_SCALE
        gray = np.clip(np.rint(wide), 0, 255).astype(np.uint8)
        return gray if channels == 1 else np.repeat(gray[:, :, None], 3, axis=2)
    return np.asarray(image.convert("L" if channels == 1 else "RGB"))


def decode_opened(image: Image.Image, size: int | None, channels: int) -> torch.Tensor:
    """An opened PIL image to uint8 [channels, size, size], or [channels, H, W] at its own
    size when `size` is None. Files in a folder and the encoded samples of a prepared dataset
    both come through here, so the two give the same pixels for the same bytes."""
    if image.format == "JPEG" and size is not None:
        image.draft("RGB" if channels == 3 else "L", (size, size))  # DCT-domain downscale
    image.load()
    array = image_pixels(image, channels)
    tensor = torch.from_numpy(np.array(array, copy=True))
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    if size is None:
        return tensor.contiguous()
    return resize_and_crop(tensor.unsqueeze(0), size)[0].contiguous()


def decode_image(path: Path, size: int, channels: int) -> torch.Tensor:
    """One file to uint8 [channels, size, size]; raises on any decoding problem."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    with Image.open(path) as image:
        return decode_opened(image, size, channels)


def decode_image_bytes(data: bytes, size: int | None, channels: int) -> torch.Tensor:
    """An image file's bytes to uint8 [channels, size, size] (see decode_opened)."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as image:
        return decode_opened(image, size, channels)


def _try_decode(path: Path, size: int, channels: int) -> torch.Tensor | str:
    try:
        return decode_image(path, size, channels)
    except Exception as error:  # any decoder failure is reported per file, never raised raw
        message = str(error).replace(str(path), "").strip(" :'\"") or "unreadable"
        return f"{type(error).__name__}: {message}"


def _candidate_order(count: int, limit: int | None, seed: int) -> np.ndarray:
    if limit is None or limit >= count:
        return np.arange(count)
    return np.random.default_rng(seed).permutation(count)


def decode_folder(
    root: Path,
    listing: FolderListing,
    size: int,
    channels: int,
    limit: int | None,
    seed: int,
    on_corrupt: str,
) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Decode up to `limit` readable files (seeded choice); (images, kept indices, skipped).

    Each image is copied into one preallocated tensor as soon as it is decoded, so the peak
    memory is the decoded dataset once (stacking a list of images at the end held it twice)."""
    files = listing.files
    if not files:
        raise DatasetError(
            f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder or below"
        )
    order = _candidate_order(len(files), limit, seed)
    wanted = len(files) if limit is None else min(limit, len(files))
    images = torch.empty((wanted, channels, size, size), dtype=torch.uint8)
    kept: list[int] = []
    skipped: list[tuple[str, str]] = []
    position = 0
    pool = ThreadPoolExecutor(max_workers=decode_workers())
    try:
        while len(kept) < wanted and position < len(order):
            batch = order[position : position + wanted - len(kept)]
            position += len(batch)
            results = pool.map(lambda i: _try_decode(files[i], size, channels), batch)
            for index, result in zip(batch, results, strict=True):
                name = files[index].relative_to(root).as_posix()
                if isinstance(result, str):
                    if on_corrupt == "fail":
                        raise CorruptImageError(str(files[index]), result)
                    skipped.append((name, result))
                else:
                    images[len(kept)] = result
                    kept.append(int(index))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    if not kept:
        shown = "; ".join(f"{name}: {reason}" for name, reason in skipped[:3])
        raise DatasetError(
            f"{root}: none of the {len(skipped)} image files could be read ({shown})"
        )
    images = images[: len(kept)]
    if kept != sorted(kept):  # a seeded choice (limit) was decoded in shuffled order
        rows = torch.from_numpy(np.argsort(np.asarray(kept), kind="stable"))
        images, kept = images[rows], sorted(kept)
    return images, kept, skipped
