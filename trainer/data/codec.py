"""Samples as a prepared dataset stores them, and their decoding to uint8 tensors.

Two kinds of sample; a prepared dataset holds one kind (its index says which):

- "encoded": an image file. A file whose shorter side is at most the storage size is kept
  byte for byte, so decoding it runs exactly what `load_dataset` runs on the file (the two paths
  give the same pixels) and nothing is lost twice. A larger file is downscaled once (shorter
  side to the storage size, aspect kept, so a crop can still see the whole image) and
  re-encoded: JPEG by default, because at a storage size of 128-512 px it is 5-10x smaller than
  raw pixels and PNG, decodes fastest per byte on a CPU (libjpeg-turbo, with a DCT-domain
  downscale when the training size is at most half the stored size), and is the one format
  GPUs decode in hardware (nvJPEG, torchvision.io.decode_jpeg on CUDA). PNG is there for
  sources whose pixels must not change.
- "array": a .npy of uint8 [C, H, W], for array sources (IDX, .npz, CIFAR-10, SVHN, STL-10,
  digits). Those are small images already held as raw pixels; storing them raw costs no more
  than the source and decodes for free.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from selfaugment.trainer.data.convert import resize_shorter_side, shape_images
from selfaugment.trainer.data.folder import (
    WIDE_GRAY_MODES,
    decode_image_bytes,
    decode_opened,
    image_pixels,
)

SampleKind = Literal["encoded", "array"]
Encoding = Literal["jpeg", "png"]
ENCODED: SampleKind = "encoded"
ARRAY: SampleKind = "array"
ARRAY_SUFFIX = ".npy"
# PIL modes kept as one gray channel when a large image is re-encoded; all others become RGB.
GRAY_MODES = ("1", "L", "LA", "F", *WIDE_GRAY_MODES)
# Chroma at full resolution: augmentations (Color, Solarize, crops) see exact colour edges.
JPEG_SUBSAMPLING_444 = 0


def _source_channels(mode: str) -> int:
    return 1 if mode in GRAY_MODES else 3


@dataclass(frozen=True)
class Stored:
    """A sample as stored: its bytes, its tar member suffix, and whether it was downscaled."""

    data: bytes
    suffix: str
    downscaled: bool


def _encode_pixels(pixels: torch.Tensor, encoding: Encoding, quality: int) -> tuple[bytes, str]:
    """uint8 [C, H, W] to (file bytes, suffix)."""
    array = pixels.permute(1, 2, 0).numpy()
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    buffer = io.BytesIO()
    if encoding == "png":
        image.save(buffer, format="PNG", compress_level=6)
        return buffer.getvalue(), ".png"
    image.save(buffer, format="JPEG", quality=quality, subsampling=JPEG_SUBSAMPLING_444)
    return buffer.getvalue(), ".jpg"


def encode_file(
    data: bytes, suffix: str, storage_size: int, encoding: Encoding, quality: int
) -> Stored:
    """An image file as stored. Raises whatever the decoder raises on a file `load_dataset`
    could not read either (the caller reports it as corrupt)."""
    if not data:
        raise ValueError("empty file (0 bytes)")
    with Image.open(io.BytesIO(data)) as image:
        channels = _source_channels(image.mode)
        if min(image.size) <= storage_size:
            decode_opened(image, None, channels)  # the whole decode: proves the file readable
            return Stored(data, suffix.lower(), downscaled=False)
        if image.format == "JPEG":
            image.draft("RGB" if channels == 3 else "L", (storage_size, storage_size))
        image.load()
        array = image_pixels(image, channels)
    tensor = torch.from_numpy(np.array(array, copy=True))
    tensor = tensor.unsqueeze(0) if tensor.dim() == 2 else tensor.permute(2, 0, 1)
    if min(tensor.shape[-2:]) > storage_size:
        tensor = resize_shorter_side(tensor, storage_size)
    encoded, encoded_suffix = _encode_pixels(tensor.contiguous(), encoding, quality)
    return Stored(encoded, encoded_suffix, downscaled=True)


def encode_array(sample: np.ndarray, storage_size: int) -> Stored:
    """uint8 [C, H, W] as .npy bytes, downscaled (shorter side to `storage_size`) if larger."""
    downscaled = min(sample.shape[-2:]) > storage_size
    if downscaled:
        resized = resize_shorter_side(torch.from_numpy(np.ascontiguousarray(sample)), storage_size)
        sample = resized.numpy()
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(sample), allow_pickle=False)
    return Stored(buffer.getvalue(), ARRAY_SUFFIX, downscaled)


def decode_sample(
    data: bytes, kind: SampleKind, size: int | None, channels: int, source: str = "sample"
) -> torch.Tensor:
    """A stored sample to uint8 [channels, size, size]; at the stored size when `size` is None
    (an image at most the storage size on its shorter side, aspect kept)."""
    if kind == ARRAY:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        tensor = torch.from_numpy(np.array(array, copy=True)).unsqueeze(0)
        return shape_images(tensor, size, channels, source)[0].contiguous()
    return decode_image_bytes(data, size, channels)
