"""Colour ops on 8-bit levels held in float32: the arithmetic of the PIL reference, batched.

The batched policy (``policy/apply.py``) keeps a batch as float32 holding whole numbers 0..255
("levels") from its first op to its last, and every op here returns whole levels rounded where
and as PIL rounds its uint8 result. So a chain of ops equals the PIL chain, not just each op:
a float path that kept the fractions PIL truncates drifted by about +0.5 level per op, and a
discrete op after it (Equalize, Posterize, Solarize, AutoContrast) turned that into tens of
levels (issue 11). Float32 rather than uint8 storage: PIL's blend computes in float32 too, and
converting to and from uint8 around every op would cost two passes over the batch per op.

Why the result is the same on every CPU and thread count: the values are whole numbers below
2**24, so differences, grayscale weights (integers) and sums are exact in float32 whatever the
order or fusion (FMA) of the operations; the blend's only inexact step, one product rounded
once and then added, is two separate torch kernels, which never fuse, as in PIL's C code
(``ImagingBlend``) on x86-64.

Per-sample arguments arrive as float64 tensors on the CPU (as Python floats reach PIL) and each
op rounds them where PIL does: enhance factors to float32 (PIL's C ``float alpha``), Solarize
thresholds and Posterize bits to whole numbers. Ops may overwrite their ``levels`` input.
"""

from __future__ import annotations

import torch
from torch import Tensor

MAX_LEVEL = 255.0

# PIL 'L': (19595 R + 38470 G + 7471 B + 2**15) >> 16, as floor(sum of R * 19595 / 2**16, ...
# + 1/2): 16-bit fractions of values below 256 need 24 bits, so every step is exact in float32.
_GRAY_WEIGHTS = (19595.0 / 65536.0, 38470.0 / 65536.0, 7471.0 / 65536.0)
_SMOOTH_DIVISOR = 13.0  # PIL's SMOOTH kernel: 1 1 1 / 1 5 1 / 1 1 1, divided by 13


def column(values: Tensor, like: Tensor) -> Tensor:
    """Per-sample values [B] as float32 [B, 1, 1, 1] on ``like``'s device (rounded to nearest,
    as C rounds a double to a float)."""
    return values.to(device=like.device, dtype=torch.float32).view(-1, 1, 1, 1)


def grayscale(levels: Tensor) -> Tensor:
    """PIL's 'L' conversion of [B, 3, H, W] levels -> [B, 1, H, W] (one channel: itself).

    Exact in float32 in any order of operations, fused multiply-adds included (see the weights).
    """
    if levels.shape[1] == 1:
        return levels
    red, green, blue = levels[:, 0:1], levels[:, 1:2], levels[:, 2:3]
    weighted = red * _GRAY_WEIGHTS[0]
    weighted.add_(green, alpha=_GRAY_WEIGHTS[1]).add_(blue, alpha=_GRAY_WEIGHTS[2])
    return weighted.add_(0.5).floor_()


def gray_mean(gray: Tensor) -> Tensor:
    """PIL's ``int(mean + 0.5)`` of each grayscale image, [B, 1, 1, 1] (exact: sums of whole
    numbers, in float32 while they stay below 2**24, then a floor of a ratio of integers)."""
    count = gray.shape[2] * gray.shape[3]
    exact_in_float32 = count * MAX_LEVEL < 2**24
    total = gray.sum(dim=(1, 2, 3), keepdim=True, dtype=None if exact_in_float32 else torch.float64)
    return total.double().mul_(2.0).add_(count).div_(2.0 * count).floor_().float()


def blend(degenerate: Tensor | float, levels: Tensor, factors: Tensor) -> Tensor:
    """PIL ``Image.blend(degenerate, image, factor)``: ``degenerate + factor * (image -
    degenerate)`` in float32, truncated and clipped to 0..255 (``levels`` is overwritten)."""
    factor = column(factors, levels)
    if isinstance(degenerate, float) and degenerate == 0.0:  # Brightness: 0 + t is exact
        return levels.mul_(factor).floor_().clamp_(0.0, MAX_LEVEL)
    levels.sub_(degenerate).mul_(factor).add_(degenerate)
    return levels.floor_().clamp_(0.0, MAX_LEVEL)


def blend_with_gray(
    levels: Tensor, factors: Tensor, gray_weights: Tensor, mean_weights: Tensor
) -> Tensor:
    """Brightness, Color and Contrast in one pass, each sample with its own op.

    Blends with ``gray_weight * grayscale + mean_weight * mean(grayscale)`` (weights 0 or 1 per
    sample): (0, 0) is Brightness, (1, 0) Color, (0, 1) Contrast, bit for bit.
    """
    if not bool((gray_weights != 0).any() or (mean_weights != 0).any()):
        return blend(0.0, levels, factors)
    gray = grayscale(levels)
    degenerate = gray * column(gray_weights, levels)
    degenerate.add_(gray_mean(gray).mul_(column(mean_weights, levels)))
    return blend(degenerate, levels, factors)


def brightness(levels: Tensor, factors: Tensor) -> Tensor:
    """Blend with black (factor 1 = identity)."""
    return blend(0.0, levels, factors)


def color(levels: Tensor, factors: Tensor) -> Tensor:
    """Blend with the grayscale image (the identity on one-channel images, as in PIL)."""
    if levels.shape[1] == 1:
        return levels
    return blend(grayscale(levels), levels, factors)


def contrast(levels: Tensor, factors: Tensor) -> Tensor:
    """Blend with the rounded mean of the grayscale image."""
    return blend(gray_mean(grayscale(levels)), levels, factors)


def sharpness(levels: Tensor, factors: Tensor) -> Tensor:
    """Blend with PIL's SMOOTH filter, border pixels unchanged (factor < 1 blurs).

    The filtered value is a multiple of 1/13, never within 1/26 of a rounding tie, so PIL's
    float kernel and our exact sums round it the same on any CPU.
    """
    degenerate = levels.clone()
    if levels.shape[2] >= 3 and levels.shape[3] >= 3:
        rows = levels[:, :, :-2] + levels[:, :, 1:-1] + levels[:, :, 2:]
        box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # 3x3 sums of the interior
        smooth = box.add_(levels[:, :, 1:-1, 1:-1], alpha=4.0).div_(_SMOOTH_DIVISOR)
        degenerate[:, :, 1:-1, 1:-1] = smooth.add_(0.5).floor_()
    return blend(degenerate, levels, factors)


def invert(levels: Tensor, arguments: Tensor | None = None) -> Tensor:
    """255 - value."""
    return levels.neg_().add_(MAX_LEVEL)


def solarize(levels: Tensor, thresholds: Tensor) -> Tensor:
    """Invert the values at or above the threshold (256 = identity).

    For whole levels ``v >= t`` is ``v >= ceil(t)``; the ceiling is taken in float64 so that a
    threshold such as 100.000001 is not rounded to 100 by a float32 cast.
    """
    threshold = column(torch.ceil(thresholds.double()), levels)
    return torch.where(levels >= threshold, MAX_LEVEL - levels, levels)


def posterize_bits(bits: Tensor) -> Tensor:
    """Bits kept, as Fast AutoAugment's ``int(v)``: truncated (in float64), within [1, 8]."""
    return torch.floor(bits.double()).clamp_(1.0, 8.0)


def posterize(levels: Tensor, bits: Tensor) -> Tensor:
    """Keep the ``posterize_bits(bits)`` most significant bits of each value."""
    step = column(torch.pow(2.0, 8.0 - posterize_bits(bits)), levels)
    return levels.div_(step).floor_().mul_(step)  # powers of two: exact


def auto_contrast(levels: Tensor, arguments: Tensor | None = None) -> Tensor:
    """Per channel, map min -> 0 and max -> 255 with PIL's ``int(v * scale + offset)`` in
    double precision (``scale = 255 / (max - min)``, not ``1 / x * 255``); flat channels
    unchanged."""
    low = levels.amin(dim=(2, 3), keepdim=True).double()
    high = levels.amax(dim=(2, 3), keepdim=True).double()
    stretch = high > low
    span = (high - low).clamp_(min=1.0)
    scale = torch.where(stretch, torch.full_like(span, MAX_LEVEL).div_(span), 1.0)  # 255 / x,
    # not torch's 255 * (1 / x), which rounds twice
    offset = torch.where(stretch, -low * scale, 0.0)
    mapped = levels.double().mul_(scale).add_(offset).floor_().clamp_(0.0, MAX_LEVEL)
    return mapped.float()


def equalize(levels: Tensor, arguments: Tensor | None = None) -> Tensor:
    """Histogram equalisation per image and channel with PIL's look-up-table formula."""
    batch, channels, height, width = levels.shape
    rows, pixels = batch * channels, height * width
    device = levels.device
    values = levels.to(torch.int64).view(rows, pixels)
    histogram = torch.zeros(rows, 256, dtype=torch.int64, device=device)
    histogram.scatter_add_(
        1, values, torch.ones((), dtype=torch.int64, device=device).expand(rows, pixels)
    )
    # PIL: step = (pixels - count of the highest occupied level) // 255; identity if step == 0
    bins = torch.arange(256, device=device, dtype=torch.int64)
    highest = torch.where(histogram > 0, bins, -1).amax(dim=1, keepdim=True)
    step = (pixels - histogram.gather(1, highest)) // 255
    before = torch.cumsum(histogram, dim=1) - histogram
    table = torch.div(step // 2 + before, step.clamp(min=1), rounding_mode="floor")
    table = torch.where(step > 0, table, bins).clamp_(0, 255)
    return table.gather(1, values).view(batch, channels, height, width).float()
