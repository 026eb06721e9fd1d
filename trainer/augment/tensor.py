"""Batched colour ops on [B, C, H, W] image tensors, equal to the PIL reference.

Inputs are uint8 (0..255) or floating point (0..1); the output has the input's dtype and
device. Arguments are per sample (a Tensor[B]) or one float for the whole batch. Each op
converts to 8-bit levels, runs the exact level op of ``augment/levels.py`` (or
``augment/tables.py``) and converts back:

- uint8 inputs give exactly ``augment/pil.py``'s result (``tests/augment/test_ops.py``);
- float inputs are read as ``levels / 255`` rounded to the nearest level, and give exactly the
  uint8 result divided by 255. There is no separate, unrounded float path: a float path that
  does not round as PIL does disagrees with it by a growing amount along a chain of ops.

The batched policy (``policy/apply.py``) calls the level ops directly and converts once per
batch, not once per op. Geometric ops and Cutout live in ``augment/geometric.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from selfaugment.trainer.augment import levels as exact
from selfaugment.trainer.augment import tables

LevelOp = Callable[[Tensor, Tensor], Tensor]
"""(float32 levels [B, C, H, W], float64 CPU arguments [B]) -> levels; may overwrite its input."""


def check_images(images: Tensor, name: str = "images") -> None:
    """Raise unless ``images`` is a [B, C, H, W] uint8 or floating tensor."""
    if images.ndim != 4:
        raise ValueError(f"{name}: expected a [B, C, H, W] batch, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise TypeError(f"{name}: expected uint8 or floating point, got {images.dtype}")


def arguments_of(values: Tensor | float, images: Tensor, name: str = "arguments") -> Tensor:
    """One float64 value per image, on the CPU, shaped [B] (the form level ops take)."""
    check_images(images)
    batch = images.shape[0]
    if isinstance(values, Tensor):
        tensor = values.detach().to(device="cpu", dtype=torch.float64)
    else:
        tensor = torch.tensor(values, dtype=torch.float64)
    if tensor.ndim == 0:
        tensor = tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(
            f"{name}: expected one value per image ({batch}), got {tuple(tensor.shape)}"
        )
    return tensor


def to_levels(images: Tensor) -> Tensor:
    """A new float32 tensor of whole levels 0..255 (floats are rounded to the nearest level)."""
    if images.dtype == torch.uint8:
        return images.float()
    return images.float().mul(exact.MAX_LEVEL).round_().clamp_(0.0, exact.MAX_LEVEL)


def from_levels(levels: Tensor, like: Tensor) -> Tensor:
    """Whole levels back to ``like``'s dtype: uint8, or floats divided by 255."""
    if like.dtype == torch.uint8:
        return levels.to(torch.uint8)
    return levels.div_(exact.MAX_LEVEL).to(like.dtype)


def on_images(
    images: Tensor, level_op: LevelOp, arguments: Tensor | float, name: str = "arguments"
) -> Tensor:
    """Run ``level_op`` on images of any supported dtype (see the module docstring)."""
    values = arguments_of(arguments, images, name)
    return from_levels(level_op(to_levels(images), values), images)


def brightness(
    images: Tensor, factors: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend with black: ``factor * image`` (factor 1 = identity)."""
    return on_images(images, exact.brightness, factors, "factors")


def color(
    images: Tensor, factors: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend with the grayscale image (identity for one-channel images)."""
    return on_images(images, exact.color, factors, "factors")


def contrast(
    images: Tensor, factors: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend with the rounded mean of the grayscale image."""
    return on_images(images, exact.contrast, factors, "factors")


def sharpness(
    images: Tensor, factors: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Blend with PIL's SMOOTH filter (border pixels unchanged); factor < 1 blurs."""
    return on_images(images, exact.sharpness, factors, "factors")


def blend_with_gray(
    images: Tensor,
    factors: Tensor | float,
    gray_weights: Tensor | float,
    mean_weights: Tensor | float,
) -> Tensor:
    """Brightness (weights 0, 0), Color (1, 0) and Contrast (0, 1) in one call, per sample."""
    gray_weight = arguments_of(gray_weights, images, "gray_weights")
    mean_weight = arguments_of(mean_weights, images, "mean_weights")

    def fused(levels: Tensor, values: Tensor) -> Tensor:
        return exact.blend_with_gray(levels, values, gray_weight, mean_weight)

    return on_images(images, fused, factors, "factors")


def invert(
    images: Tensor, arguments: Tensor | float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """255 - value (1 - value for floats)."""
    return on_images(images, exact.invert, arguments)


def solarize(
    images: Tensor, thresholds: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Invert the values at or above the threshold (0..256 scale; 256 = identity)."""
    return on_images(images, tables.solarize, thresholds, "thresholds")


def posterize(
    images: Tensor, bits: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Keep the most significant bits (bits truncated, within [1, 8]; 8 = identity)."""
    return on_images(images, exact.posterize, bits, "bits")


def auto_contrast(
    images: Tensor, arguments: Tensor | float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Per channel, map min -> 0 and max -> 255 linearly (flat channels unchanged)."""
    return on_images(images, tables.auto_contrast, arguments)


def equalize(
    images: Tensor, arguments: Tensor | float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """Histogram equalisation per image and channel with PIL's look-up-table formula."""
    return on_images(images, tables.equalize, arguments)
