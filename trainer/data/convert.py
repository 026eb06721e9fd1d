"""Pixel conversions shared by all readers: dtype, layout, channels and size.

Resizing and centre cropping are written on torch alone, not torchvision's functional API,
because importing torchvision imports its models and ops and through them ``torch._dynamo``
(about 1.5 s of start-up on a 2-core machine), which every short worker process of a search
paid. They give the same pixels as torchvision 0.29's ``resize`` (bilinear, antialias) and
``center_crop`` on uint8 tensors, so data prepared by earlier versions stays identical
(``tests/data/test_resize_compat.py`` compares them with torchvision).
"""

from __future__ import annotations

import platform

import numpy as np
import torch
from torch.nn import functional as F

from selfaugment.trainer.data.types import DatasetError

# Channel counts a decoded array may have: gray, gray+alpha is not accepted, RGB, RGBA.
CHANNEL_COUNTS = (1, 3, 4)
# ITU-R 601-2 luma weights, as PIL uses for RGB -> L (Pillow docs, Image.convert).
LUMA_WEIGHTS = (299, 587, 114)
# Images resized per call; bounds the float32 copy made inside the resize.
RESIZE_CHUNK = 2048


def to_uint8(array: np.ndarray, source: str) -> np.ndarray:
    """Pixels as uint8: integers in 0..255 are kept, floats in [0, 1] are scaled by 255."""
    if array.dtype == np.uint8:
        return array
    if array.size == 0:
        return array.astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        if np.isnan(array).any() or low < 0.0 or high > 1.0:
            raise DatasetError(
                f"{source}: float images must lie in [0, 1], found values in [{low:g}, {high:g}]"
            )
        return np.rint(array * 255.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise DatasetError(
                f"{source}: integer images must lie in 0..255, found values in [{low}, {high}]"
            )
        return array.astype(np.uint8)
    raise DatasetError(f"{source}: unsupported image dtype {array.dtype}")


def to_nchw(array: np.ndarray, source: str) -> np.ndarray:
    """Accept [N, H, W], [N, H, W, C] or [N, C, H, W] (C in 1, 3, 4) and return [N, C, H, W]."""
    if array.ndim == 3:
        return array[:, None, :, :]
    if array.ndim != 4:
        raise DatasetError(
            f"{source}: images must have shape [N, H, W], [N, H, W, C] or [N, C, H, W], "
            f"got {tuple(array.shape)}"
        )
    last_is_channel = array.shape[3] in CHANNEL_COUNTS
    second_is_channel = array.shape[1] in CHANNEL_COUNTS
    if last_is_channel and second_is_channel:
        raise DatasetError(
            f"{source}: cannot tell channels from image sides in shape {tuple(array.shape)} "
            "(both dimension 1 and 3 look like channel counts)"
        )
    if last_is_channel:
        return np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    if second_is_channel:
        return array
    raise DatasetError(
        f"{source}: no channel dimension of size 1, 3 or 4 in shape {tuple(array.shape)}"
    )


def convert_channels(images: torch.Tensor, channels: int, source: str) -> torch.Tensor:
    """uint8 [N, C, H, W] to `channels`: gray is repeated to RGB, RGB becomes luma, alpha dropped."""
    have = images.shape[1]
    if have == 4:
        images, have = images[:, :3], 3
    if have == channels:
        return images
    if have == 1 and channels == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    if have == 3 and channels == 1:
        red, green, blue = (images[:, i].to(torch.int32) for i in range(3))
        weights = LUMA_WEIGHTS
        luma = (red * weights[0] + green * weights[1] + blue * weights[2] + 500) // 1000
        return luma.to(torch.uint8).unsqueeze(1)
    raise DatasetError(f"{source}: cannot convert {have}-channel images to {channels} channels")


def _native_uint8_bilinear(device: torch.device) -> bool:
    """Whether uint8 images are interpolated as uint8 rather than through float32.

    torch has a uint8 antialiased-bilinear kernel for CPUs with AVX2 or AVX-512 and for ARM; the
    float32 route (interpolate, round half to even, cast) differs from it by one grey level in
    some pixels. torchvision picks the native kernel on exactly those CPUs, so the same rule
    here keeps the pixels equal to torchvision's on every machine."""
    if device.type != "cpu":
        return False
    capability = torch.backends.cpu.get_cpu_capability()
    return capability in ("AVX2", "AVX512") or platform.machine() in ("aarch64", "arm64")


def resized_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(height, width) with the shorter side `size` and the aspect kept, the longer side rounded
    down (computed in floating point as torchvision does, so sizes agree with it)."""
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_shorter_side(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [..., C, H, W] with the shorter side resized to `size`: bilinear, antialiased
    when shrinking, half-pixel centres (align_corners=False). Returns `images` itself when the
    size is unchanged."""
    if images.dtype != torch.uint8:
        raise ValueError(f"resize_shorter_side expects uint8 images, got {images.dtype}")
    *leading, channels, height, width = images.shape
    new_height, new_width = resized_size(height, width, size)
    if (new_height, new_width) == (height, width):
        return images
    if images.numel() == 0:
        return images.new_zeros((*leading, channels, new_height, new_width))
    batch = images.reshape(-1, channels, height, width)
    numel = batch.numel()
    if (
        batch.shape[0] == 1
        and batch.is_contiguous(memory_format=torch.channels_last)
        and batch.stride(0) != numel
    ):
        # One channels-last image (an HWC array seen as CHW): give the batch dimension a stride
        # that marks it channels-last unambiguously, so interpolate keeps that layout.
        batch = batch.as_strided(batch.shape, (numel, *batch.stride()[1:]))
    if _native_uint8_bilinear(batch.device):
        resized = F.interpolate(
            batch,
            size=[new_height, new_width],
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
    else:
        resized = F.interpolate(
            batch.to(torch.float32),
            size=[new_height, new_width],
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )
        resized = resized.round_().to(torch.uint8)
    return resized.reshape(*leading, channels, new_height, new_width)


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centre `height` x `width` window of [..., H, W]; a side shorter than the window is
    padded with zeros on both ends first (the extra pixel of an odd padding at the end). An odd
    margin puts the window at round(margin / 2), Python's round half to even, as torchvision."""
    image_height, image_width = images.shape[-2:]
    if images.numel() == 0:
        return images.reshape(*images.shape[:-2], height, width)
    if height > image_height or width > image_width:
        pad_width = max(width - image_width, 0)
        pad_height = max(height - image_height, 0)
        images = F.pad(
            images,
            [pad_width // 2, (pad_width + 1) // 2, pad_height // 2, (pad_height + 1) // 2],
            value=0.0,
        )
        image_height, image_width = images.shape[-2:]
    top = round((image_height - height) / 2.0)
    left = round((image_width - width) / 2.0)
    return images[..., top : top + height, left : left + width]


def resize_and_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to `size` (bilinear, antialiased when shrinking), centre-crop."""
    height, width = images.shape[-2:]
    if height == size and width == size:
        return images
    outputs = []
    for start in range(0, images.shape[0], RESIZE_CHUNK):
        chunk = images[start : start + RESIZE_CHUNK]
        if min(height, width) != size:
            chunk = resize_shorter_side(chunk, size)
        outputs.append(center_crop(chunk, size, size))
    if not outputs:
        return images.new_zeros((0, images.shape[1], size, size))
    return torch.cat(outputs)


def shape_images(
    images: torch.Tensor, size: int | None, channels: int, source: str
) -> torch.Tensor:
    """uint8 [N, C, H, W] to `channels` and, unless `size` is None, to [N, channels, size, size].

    The one place that orders the two steps, so that a whole array (load_dataset) and a single
    stored sample (the prepared-dataset reader) come out pixel for pixel the same."""
    if size is None:
        return convert_channels(images, channels, source)
    if images.shape[1] < channels:  # repeat gray to RGB after resizing: less work
        return convert_channels(resize_and_crop(images, size), channels, source)
    return resize_and_crop(convert_channels(images, channels, source), size)


def array_to_nchw(array: np.ndarray, source: str) -> np.ndarray:
    """Any accepted array layout and dtype to writable, contiguous uint8 [N, C, H, W]."""
    nchw = to_nchw(to_uint8(np.asarray(array), source), source)
    if not (nchw.flags.writeable and nchw.flags.c_contiguous):
        nchw = np.array(nchw, order="C")  # torch wants writable memory
    return nchw


def prepare_images(array: np.ndarray, size: int, channels: int, source: str) -> torch.Tensor:
    """Any accepted array layout and dtype to uint8 [N, channels, size, size]."""
    return shape_images(torch.from_numpy(array_to_nchw(array, source)), size, channels, source)
