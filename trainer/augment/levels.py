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
AutoContrast, Equalize and Solarize, which are look-up tables per channel, are in
``augment/tables.py``.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import Tensor

MAX_LEVEL = 255.0

# PIL 'L': (19595 R + 38470 G + 7471 B + 2**15) >> 16, as floor(sum of R * 19595 / 2**16, ...
# + 1/2): 16-bit fractions of values below 256 need 24 bits, so every step is exact in float32.
_GRAY_WEIGHTS = (19595.0 / 65536.0, 38470.0 / 65536.0, 7471.0 / 65536.0)
_SMOOTH_DIVISOR = 13.0  # PIL's SMOOTH kernel: 1 1 1 / 1 5 1 / 1 1 1, divided by 13


def column(values: Tensor, like: Tensor) -> Tensor:
    """Per-sample values [B] as float32 [B, 1, 1, 1] on ``like``'s device (rounded to nearest,
    as C rounds a double to a float). CPU values are converted by numpy: a torch conversion of
    a few numbers costs ten times more, and a policy makes dozens per batch."""
    if values.device.type == "cpu" and like.device.type == "cpu":
        return torch.from_numpy(values.numpy().astype(np.float32)).view(-1, 1, 1, 1)
    return values.to(device=like.device, dtype=torch.float32).view(-1, 1, 1, 1)


def grayscale(levels: Tensor) -> Tensor:
    """PIL's 'L' conversion of [B, 3, H, W] levels -> a new [B, 1, H, W] tensor (one channel:
    ``levels`` itself).

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
    if total.device.type == "cpu":  # a few numbers: numpy is cheaper than five torch calls
        mean = np.floor((total.numpy().astype(np.float64) * 2.0 + count) / (2.0 * count))
        return torch.from_numpy(mean.astype(np.float32))
    return total.double().mul_(2.0).add_(count).div_(2.0 * count).floor_().float()


def _cpu_numpy(values: Tensor) -> np.ndarray:
    return values.numpy() if values.device.type == "cpu" else values.detach().cpu().numpy()


def _within_unit(factors: Tensor) -> bool:
    """True when every factor is in [0, 1]: the blend is then a convex combination of two
    values in 0..255, and so is its float32 rounding (rounding is monotone and both ends are
    representable), so the clip can be skipped."""
    values = _cpu_numpy(factors)
    return bool(values.min() >= 0.0) and bool(values.max() <= 1.0)


def _any_nonzero(values: Tensor) -> bool:
    return bool(np.any(_cpu_numpy(values)))


_CHUNK_VALUES = 1 << 17
"""Values per chunk of a multi-pass op (512 KiB of float32): a chunk stays in the core's L2
cache from its first pass to its last, where a whole batch of 256 x 3 x 32 x 32 (3 MiB) went
to memory and back on every pass (the blend's five passes ran 1.3-1.4x faster in chunks)."""


def chunks(levels: Tensor, *per_sample: Tensor) -> list[tuple[Tensor, ...]]:
    """``levels`` and each per-sample tensor (first dimension B, or 1 to broadcast) split into
    matching chunks of whole samples (views: in-place ops on them write into ``levels``); the
    tensors themselves when they fit in one chunk, as most groups of a policy do."""
    batch = levels.shape[0]
    step = max(1, _CHUNK_VALUES // max(1, levels[0].numel())) if batch else 1
    if batch <= step:
        return [(levels, *per_sample)]
    return [
        (levels[first : first + step],
         *(other if other.shape[0] == 1 else other[first : first + step] for other in per_sample))
        for first in range(0, batch, step)
    ]  # fmt: skip


def blend(degenerate: Tensor | float, levels: Tensor, factors: Tensor) -> Tensor:
    """PIL ``Image.blend(degenerate, image, factor)``: ``degenerate + factor * (image -
    degenerate)`` in float32, truncated and clipped to 0..255 (``levels`` is overwritten).

    ``degenerate`` is an image [B, 1 or C, H, W], a value per sample [B, 1, 1, 1], or 0.0.
    Each step is its own pass (a fused multiply-add would round once where PIL rounds twice),
    run chunk by chunk (``chunks``) so that the passes after the first read from the cache.
    """
    factor = column(factors, levels)
    clip = not _within_unit(factors)
    if isinstance(degenerate, float) and degenerate == 0.0:  # Brightness: 0 + t is exact
        for part, part_factor in chunks(levels, factor):
            part.mul_(part_factor).floor_()
            if clip:
                part.clamp_(0.0, MAX_LEVEL)
        return levels
    if isinstance(degenerate, float):
        degenerate = torch.full((1, 1, 1, 1), degenerate, device=levels.device)
    for part, part_factor, part_degenerate in chunks(levels, factor, degenerate):
        part.sub_(part_degenerate).mul_(part_factor).add_(part_degenerate).floor_()
        if clip:
            part.clamp_(0.0, MAX_LEVEL)
    return levels


def blend_with_gray(
    levels: Tensor, factors: Tensor, gray_weights: Tensor, mean_weights: Tensor
) -> Tensor:
    """Brightness, Color and Contrast in one pass, each sample with its own op.

    Blends with ``gray_weight * grayscale + mean_weight * mean(grayscale)`` (weights 0 or 1 per
    sample): (0, 0) is Brightness, (1, 0) Color, (0, 1) Contrast, bit for bit. Computes only
    what the samples need: no grayscale without Color or Contrast, and a value per sample
    rather than an image when there is no Color.
    """
    use_gray, use_mean = _any_nonzero(gray_weights), _any_nonzero(mean_weights)
    if not use_gray and not use_mean:
        return blend(0.0, levels, factors)
    gray = grayscale(levels)
    mean = gray_mean(gray) if use_mean else None
    if not use_gray:
        return blend(cast(Tensor, mean).mul_(column(mean_weights, levels)), levels, factors)
    if gray is levels:  # one channel: grayscale is the image itself
        gray = gray.clone()
    degenerate = gray.mul_(column(gray_weights, levels))
    if mean is not None:
        degenerate.add_(mean.mul_(column(mean_weights, levels)))
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
    float kernel and our exact sums round it the same on any CPU. PIL's filter leaves the
    border as it is, and a blend of a value with itself is that value, so only the interior
    is blended (in place, through a view).
    """
    if levels.shape[2] >= 3 and levels.shape[3] >= 3:
        rows = levels[:, :, :-2] + levels[:, :, 1:-1] + levels[:, :, 2:]
        box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]  # 3x3 sums of the interior
        interior = levels[:, :, 1:-1, 1:-1]
        smooth = box.add_(interior, alpha=4.0).div_(_SMOOTH_DIVISOR).add_(0.5).floor_()
        blend(smooth, interior, factors)
    return levels


def invert(levels: Tensor, arguments: Tensor | None = None) -> Tensor:
    """255 - value."""
    return levels.neg_().add_(MAX_LEVEL)


def posterize_bits(bits: Tensor) -> Tensor:
    """Bits kept, as Fast AutoAugment's ``int(v)``: truncated (in float64), within [1, 8]."""
    return torch.from_numpy(np.clip(np.floor(_cpu_numpy(bits).astype(np.float64)), 1.0, 8.0))


def posterize(levels: Tensor, bits: Tensor) -> Tensor:
    """Keep the ``posterize_bits(bits)`` most significant bits of each value."""
    step = column(torch.from_numpy(2.0 ** (8.0 - posterize_bits(bits).numpy())), levels)
    return levels.div_(step).floor_().mul_(step)  # powers of two: exact
