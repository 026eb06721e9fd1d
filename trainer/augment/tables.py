"""Colour ops that are a look-up table per image and channel: AutoContrast, Equalize, Solarize.

Each of these maps a level to a level through a table that depends only on the op's argument
and on a statistic of the channel (its minimum and maximum, its histogram). The table is built
for the 256 levels exactly as ``augment/levels.py`` and PIL compute each value, and applied by
one indexed read; the image is never taken through float64 or int64 arithmetic per pixel, which
cost several passes (and ``torch.where``, slow on the CPU). Same inputs, outputs and exactness
as the level ops: float32 whole levels [B, C, H, W], float64 CPU arguments [B].
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfaugment.trainer.augment.levels import MAX_LEVEL

LEVELS = 256


def table_index(levels: Tensor) -> Tensor:
    """Each value's row in the stacked tables of its image and channel: ``level + 256 * (b * C
    + c)``, int64 [B * C, H * W]."""
    batch, channels, height, width = levels.shape
    index = levels.to(torch.int64).view(batch * channels, height * width)
    offsets = torch.arange(0, batch * channels * LEVELS, LEVELS, device=levels.device)
    return index.add_(offsets.view(-1, 1))


def look_up(tables: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """The values of ``tables`` [B * C, 256] (float32 levels) at ``index`` (``table_index``),
    shaped like ``like``."""
    return tables.reshape(-1).index_select(0, index.view(-1)).view(like.shape)


def _all_levels(levels: Tensor, dtype: torch.dtype) -> Tensor:
    return torch.arange(LEVELS, device=levels.device, dtype=dtype)


def solarize(levels: Tensor, thresholds: Tensor) -> Tensor:
    """Invert the values at or above the threshold (256 = identity).

    For whole levels ``v >= t`` is ``v >= ceil(t)``; the ceiling is taken in float64 so that a
    threshold such as 100.000001 is not rounded to 100 by a float32 cast.
    """
    batch, channels = levels.shape[:2]
    ceiling = torch.ceil(thresholds.double()).to(levels.device).view(batch, 1, 1)
    values = _all_levels(levels, torch.float64)
    table = torch.where(values >= ceiling, MAX_LEVEL - values, values)  # [B, 1, 256]
    tables = table.expand(batch, channels, LEVELS).to(torch.float32)
    return look_up(tables, table_index(levels), levels)


def auto_contrast(levels: Tensor, arguments: Tensor | None = None) -> Tensor:
    """Per channel, map min -> 0 and max -> 255 with PIL's ``int(v * scale + offset)`` in
    double precision (``scale = 255 / (max - min)``, not ``1 / x * 255``); flat channels
    unchanged."""
    low = levels.amin(dim=(2, 3)).double().view(-1, 1)  # [B * C, 1]
    high = levels.amax(dim=(2, 3)).double().view(-1, 1)
    stretch = high > low
    span = (high - low).clamp_(min=1.0)
    scale = torch.where(stretch, torch.full_like(span, MAX_LEVEL).div_(span), 1.0)  # 255 / x,
    # not torch's 255 * (1 / x), which rounds twice
    offset = torch.where(stretch, -low * scale, 0.0)
    values = _all_levels(levels, torch.float64)
    tables = values.mul(scale).add_(offset).floor_().clamp_(0.0, MAX_LEVEL).float()
    return look_up(tables, table_index(levels), levels)


def equalize(levels: Tensor, arguments: Tensor | None = None) -> Tensor:
    """Histogram equalisation per image and channel with PIL's look-up-table formula."""
    rows, pixels = levels.shape[0] * levels.shape[1], levels.shape[2] * levels.shape[3]
    index = table_index(levels)
    histogram = torch.bincount(index.view(-1), minlength=rows * LEVELS).view(rows, LEVELS)
    # PIL: step = (pixels - count of the highest occupied level) // 255; identity if step == 0
    bins = _all_levels(levels, torch.int64)
    highest = torch.where(histogram > 0, bins, -1).amax(dim=1, keepdim=True)
    step = (pixels - histogram.gather(1, highest)) // 255
    before = torch.cumsum(histogram, dim=1) - histogram
    table = torch.div(step // 2 + before, step.clamp(min=1), rounding_mode="floor")
    tables = torch.where(step > 0, table, bins).clamp_(0, 255).float()
    return look_up(tables, index, levels)
