"""Batched colour ops on [B, C, H, W] tensors that reproduce the PIL reference.

Inputs are uint8 (0..255) or floating point (0..1); the output has the input's dtype and
device. Arguments are per sample (a Tensor[B]) or one float for the whole batch. Work is
done in float32 on the 0..255 scale ("levels"). For uint8 inputs the result is rounded the
way PIL rounds, so it matches ``augment/pil.py`` exactly (``tests/augment/test_ops.py``):

- enhance ops blend ``degenerate + factor * (image - degenerate)`` in float32 and truncate
  (PIL ``ImagingBlend``); grayscale is PIL's integer ``L`` conversion
  ``(19595 R + 38470 G + 7471 B + 32768) >> 16`` (weights 0.299/0.587/0.114);
- Contrast blends with the rounded mean of the grayscale image (PIL ``ImageEnhance``);
- Sharpness blends with PIL's SMOOTH filter (3x3 kernel 1,1,1;1,5,1;1,1,1 / 13, rounded,
  border pixels kept);
- Equalize and AutoContrast use PIL's per-channel look-up-table formulas.

Float inputs take a faster path on the 0..1 scale without rounding (so they equal the
uint8 result within about one level), except in the inherently discrete ops Equalize and
Posterize, which quantise to 256 levels first. The float path avoids boolean masks and
``torch.where`` on whole images (several times slower than arithmetic on CPU). Geometric
ops and Cutout live in ``augment/geometric.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Rounding = Literal["floor", "round", "none"]

_SMOOTH_KERNEL = ((1.0, 1.0, 1.0), (1.0, 5.0, 1.0), (1.0, 1.0, 1.0))
_SMOOTH_DIVISOR = 13.0
_FLOAT_LEVEL_TOLERANCE = 1e-3  # float round-off of exact levels (u / 255 * 255 != u)


def check_images(images: Tensor, name: str = "images") -> None:
    """Raise unless ``images`` is a [B, C, H, W] uint8 or floating tensor."""
    if images.ndim != 4:
        raise ValueError(f"{name}: expected a [B, C, H, W] batch, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"{name}: expected uint8 or floating point, got {images.dtype}")


def per_sample(values: Tensor | float, images: Tensor, name: str = "arguments") -> Tensor:
    """One float32 value per image on the images' device, shaped [B, 1, 1, 1]."""
    check_images(images)
    batch = images.shape[0]
    tensor = torch.as_tensor(values, dtype=torch.float32, device=images.device)
    if tensor.ndim == 0:
        tensor = tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(
            f"{name}: expected one value per image ({batch}), got {tuple(tensor.shape)}"
        )
    return tensor.view(batch, 1, 1, 1)


def to_levels(images: Tensor) -> Tensor:
    """A new float32 tensor on the 0..255 scale."""
    if images.dtype == torch.uint8:
        return images.float()
    return images.float() * 255.0


def from_levels(levels: Tensor, like: Tensor, rounding: Rounding) -> Tensor:
    """Back to ``like``'s dtype: uint8 rounded as PIL does, floats divided by 255 (in place)."""
    if like.dtype == torch.uint8:
        if rounding == "floor":
            levels = levels.floor_()
        elif rounding == "round":
            levels = levels.add_(0.5).floor_()
        return levels.clamp_(0.0, 255.0).to(torch.uint8)
    return levels.div_(255.0).clamp_(0.0, 1.0).to(like.dtype)


def quantized_levels(images: Tensor) -> Tensor:
    """Integer levels 0..255 as float32 (floats are rounded to the nearest level)."""
    if images.dtype == torch.uint8:
        return images.float()
    return images.float().mul(255.0).add_(0.5).floor_().clamp_(0.0, 255.0)


def grayscale_levels(levels: Tensor, exact: bool) -> Tensor:
    """PIL 'L' conversion of [B, C, H, W] levels -> [B, 1, H, W] (C = 1 is returned as is)."""
    if levels.shape[1] == 1:
        return levels
    red, green, blue = levels[:, 0:1], levels[:, 1:2], levels[:, 2:3]
    if exact:  # integer arithmetic below 2**24, exact in float32
        return (red * 19595.0 + green * 38470.0 + blue * 7471.0 + 32768.0).div_(65536.0).floor_()
    return red * 0.299 + green * 0.587 + blue * 0.114


def as_float32(images: Tensor) -> Tensor:
    """Float images as float32 (no copy when they already are)."""
    return images if images.dtype == torch.float32 else images.float()


def _blend(degenerate: Tensor, images: Tensor, factors: Tensor | float) -> Tensor:
    """PIL ``Image.blend(degenerate, image, factor)`` (degenerate on the images' scale)."""
    factor = per_sample(factors, images)
    if images.dtype == torch.uint8:  # float32 arithmetic, truncated, as PIL does
        levels = images.float()
        return from_levels(degenerate + factor * (levels - degenerate), images, "floor")
    blended = torch.lerp(degenerate, as_float32(images), factor).clamp_(0.0, 1.0)
    return blended.to(images.dtype)


def _grayscale(images: Tensor) -> Tensor:
    """[B, 1, H, W] grayscale on the images' scale (PIL's integer formula for uint8)."""
    return grayscale_levels(as_float32(images), exact=images.dtype == torch.uint8)


def brightness(
    images: Tensor, factors: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend with black: ``factor * image`` (factor 1 = identity)."""
    return _blend(torch.zeros((), device=images.device), images, factors)


def color(
    images: Tensor, factors: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend with the grayscale image (identity for one-channel images)."""
    if images.shape[1] != 3:
        return images.clone()
    return _blend(_grayscale(images), images, factors)


def _gray_mean(gray: Tensor, exact: bool) -> Tensor:
    """Per-image mean [B, 1, 1, 1] of a grayscale batch; PIL's int(mean + 0.5) if exact."""
    if not exact:
        return gray.mean(dim=(1, 2, 3), keepdim=True)
    count = gray.shape[2] * gray.shape[3]
    total = gray.to(torch.int64).sum(dim=(1, 2, 3), keepdim=True)
    return torch.div(2 * total + count, 2 * count, rounding_mode="floor").float()


def contrast(
    images: Tensor, factors: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend with the mean of the grayscale image (rounded to an integer for uint8)."""
    exact = images.dtype == torch.uint8
    return _blend(_gray_mean(_grayscale(images), exact), images, factors)


def blend_with_gray(
    images: Tensor,
    factors: Tensor | float,
    gray_weights: Tensor | float,
    mean_weights: Tensor | float,
) -> Tensor:
    """Brightness, Color and Contrast in one call, each sample with its own op.

    Blends with ``gray_weight * grayscale + mean_weight * mean(grayscale)``: weights
    (0, 0) give Brightness, (1, 0) Color and (0, 1) Contrast, bit for bit.
    """
    gray_weight = per_sample(gray_weights, images)
    mean_weight = per_sample(mean_weights, images)
    if not bool((gray_weight != 0).any() or (mean_weight != 0).any()):
        return brightness(images, factors)
    gray = _grayscale(images)
    mean = _gray_mean(gray, exact=images.dtype == torch.uint8)
    return _blend(gray * gray_weight + mean * mean_weight, images, factors)


def sharpness(
    images: Tensor, factors: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend with PIL's SMOOTH filter (border pixels unchanged); factor < 1 blurs."""
    values = as_float32(images)
    degenerate = values.clone()
    if images.shape[2] >= 3 and images.shape[3] >= 3:
        rows = values[:, :, :-2] + values[:, :, 1:-1] + values[:, :, 2:]
        box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # 3x3 sums of the interior
        smooth = box.add_(values[:, :, 1:-1, 1:-1], alpha=4.0).div_(_SMOOTH_DIVISOR)
        if images.dtype == torch.uint8:  # PIL rounds the filtered value
            smooth = smooth.add_(0.5).floor_()
        degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, images, factors)


def invert(
    images: Tensor, arguments: Tensor | float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """255 - value (1 - value for floats)."""
    check_images(images)
    return 255 - images if images.dtype == torch.uint8 else 1.0 - images


def solarize(
    images: Tensor, thresholds: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Invert the values at or above the threshold (0..256 scale; 256 = identity)."""
    threshold = per_sample(thresholds, images)
    if images.dtype == torch.uint8:
        return torch.where(images.float() >= threshold, 255 - images, images)
    values = as_float32(images)
    # flip = 1 where 255 * x + tolerance >= threshold, else 0 (arithmetic, no bool mask)
    flip = (values * 255.0).add_(1.0 + _FLOAT_LEVEL_TOLERANCE - threshold).floor_().clamp_(0, 1)
    return flip.sub_(values).abs_().to(images.dtype)  # |x - 1| = 1 - x where flipped


def posterize(
    images: Tensor, bits: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Keep the most significant bits (bits rounded half up, within [1, 8]; 8 = identity)."""
    kept_bits = per_sample(bits, images).add(0.5).floor_().clamp_(1.0, 8.0)
    step = torch.pow(2.0, 8.0 - kept_bits)
    posterized = quantized_levels(images).div_(step).floor_().mul_(step)
    return from_levels(posterized, images, "none")


def auto_contrast(
    images: Tensor, arguments: Tensor | float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Per channel, map min -> 0 and max -> 255 linearly (flat channels unchanged)."""
    check_images(images)
    values = as_float32(images)
    low = values.amin(dim=(2, 3), keepdim=True)
    high = values.amax(dim=(2, 3), keepdim=True)
    stretch = high > low
    if images.dtype == torch.uint8:  # PIL: int(v * scale + offset) in double precision
        span = (high - low).double().clamp_(min=1.0)
        scale = torch.where(stretch, torch.full_like(span, 255.0).div_(span), 1.0)  # not 1/x*255
        offset = torch.where(stretch, -low.double() * scale, 0.0)
        mapped = (values.double() * scale + offset).floor_().clamp_(0.0, 255.0)
        return mapped.to(torch.uint8)
    span = (high - low).clamp_(min=1e-6)
    scale = torch.where(stretch, torch.ones_like(span).div_(span), 1.0)
    offset = torch.where(stretch, -low * scale, 0.0)
    return (values * scale).add_(offset).clamp_(0.0, 1.0).to(images.dtype)


def equalize(
    images: Tensor, arguments: Tensor | float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Histogram equalisation per image and channel with PIL's look-up-table formula."""
    check_images(images)
    batch, channels, height, width = images.shape
    rows, pixels = batch * channels, height * width
    values = quantized_levels(images).to(torch.int64).view(rows, pixels)
    histogram = torch.zeros(rows, 256, dtype=torch.int64, device=images.device)
    histogram.scatter_add_(
        1, values, torch.ones((), dtype=torch.int64, device=images.device).expand(rows, pixels)
    )
    # PIL: step = (pixels - count of the highest occupied level) // 255; identity if step == 0
    bins = torch.arange(256, device=images.device, dtype=torch.int64)
    highest = torch.where(histogram > 0, bins, -1).amax(dim=1, keepdim=True)
    step = (pixels - histogram.gather(1, highest)) // 255
    before = torch.cumsum(histogram, dim=1) - histogram
    table = torch.div(step // 2 + before, step.clamp(min=1), rounding_mode="floor")
    table = torch.where(step > 0, table, bins).clamp_(0, 255)
    equalized = table.gather(1, values).view(batch, channels, height, width)
    return from_levels(equalized.float(), images, "none")
