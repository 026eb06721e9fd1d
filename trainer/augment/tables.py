"""Colour ops that are a look-up table per image and channel: AutoContrast, Equalize, Solarize.

Each of these maps a level to a level through a table that depends only on the op's argument
and on a statistic of the channel (its minimum and maximum, its histogram). The 256-entry
tables are built in numpy, exactly as ``augment/levels.py`` and PIL compute each value, and
applied by one indexed read: the image is never taken through float64 or int64 arithmetic per
pixel, and the table math, a few thousand numbers, costs microseconds in numpy where a dozen
small torch calls cost a millisecond on the CPU. Same inputs, outputs and exactness as the
level ops: float32 whole levels [B, C, H, W], float64 CPU arguments [B].
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from selfaugment.trainer.augment.levels import MAX_LEVEL

LEVELS = 256
_ALL = np.arange(LEVELS, dtype=np.float64)


def table_index(levels: Tensor) -> Tensor:
    """Each value's place in the stacked tables of its image and channel: ``level + 256 * (b *
    C + c)``, int32 [B * C, H * W] (half the memory traffic of int64; 2**31 / 256 rows)."""
    batch, channels, height, width = levels.shape
    index = levels.to(torch.int32).view(batch * channels, height * width)
    offsets = torch.arange(
        0, batch * channels * LEVELS, LEVELS, device=levels.device, dtype=torch.int32
    )
    return index.add_(offsets.view(-1, 1))


def look_up(tables: np.ndarray, index: Tensor, like: Tensor) -> Tensor:
    """The values of ``tables`` [B * C, 256] (levels) at ``index`` (``table_index``), as float32
    shaped like ``like``."""
    flat = torch.from_numpy(tables.astype(np.float32).reshape(-1)).to(like.device)
    return flat.index_select(0, index.view(-1)).view(like.shape)


def _numpy(values: Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


def solarize(levels: Tensor, thresholds: Tensor) -> Tensor:
    """Invert the values at or above the threshold (256 = identity).

    For whole levels ``v >= t`` is ``v >= ceil(t)``; the ceiling is taken in float64 so that a
    threshold such as 100.000001 is not rounded to 100 by a float32 cast.
    """
    ceiling = np.ceil(_numpy(thresholds).astype(np.float64))[:, None]
    table = np.where(ceiling <= _ALL, MAX_LEVEL - _ALL, _ALL)  # [B, 256]
    return look_up(np.repeat(table, levels.shape[1], axis=0), table_index(levels), levels)


def auto_contrast(levels: Tensor, arguments: Tensor | None = None) -> Tensor:
    """Per channel, map min -> 0 and max -> 255 with PIL's ``int(v * scale + offset)`` in
    double precision (``scale = 255 / (max - min)``, not ``1 / x * 255``); flat channels
    unchanged."""
    low = _numpy(levels.amin(dim=(2, 3))).astype(np.float64).reshape(-1, 1)  # [B * C, 1]
    high = _numpy(levels.amax(dim=(2, 3))).astype(np.float64).reshape(-1, 1)
    stretch = high > low
    scale = np.where(stretch, MAX_LEVEL / np.maximum(high - low, 1.0), 1.0)  # 255 / x, not
    # 255 * (1 / x), which rounds twice
    offset = np.where(stretch, -low * scale, 0.0)
    tables = np.clip(np.floor(_ALL * scale + offset), 0.0, MAX_LEVEL)
    return look_up(tables, table_index(levels), levels)


def equalize(levels: Tensor, arguments: Tensor | None = None) -> Tensor:
    """Histogram equalisation per image and channel with PIL's look-up-table formula.

    The histograms are one ``torch.bincount`` (twice as fast as numpy's on the CPU); PIL's
    integer quotient ``(step // 2 + before) // step`` is taken as the floor of a float64
    quotient, which equals it for numerators below 2**53 (any image): the rounding error of
    the quotient, at most quotient * 2**-53, is then smaller than 1 / step, the least distance
    from a fraction n / step to the next whole number (numpy divides integers one at a time,
    floats in vector registers).
    """
    rows, pixels = levels.shape[0] * levels.shape[1], levels.shape[2] * levels.shape[3]
    index = table_index(levels)
    counts = torch.bincount(index.view(-1), minlength=rows * LEVELS)
    histogram = _numpy(counts).reshape(rows, LEVELS)
    # PIL: step = (pixels - count of the highest occupied level) // 255; identity if step == 0
    highest = LEVELS - 1 - np.argmax(histogram[:, ::-1] > 0, axis=1)  # no channel is empty
    step = (pixels - histogram[np.arange(rows), highest]) // 255
    before = np.cumsum(histogram, axis=1) - histogram
    divisor = np.maximum(step, 1).astype(np.float64)[:, None]
    table = np.floor(((step // 2)[:, None] + before) / divisor)
    tables = np.where(step[:, None] > 0, np.minimum(table, MAX_LEVEL), _ALL)
    return look_up(tables, index, levels)
