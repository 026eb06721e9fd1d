"""Render what a policy does: a PNG grid of originals and augmented samples (PIL only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from selfaugment.trainer.augment.tensor import check_images
from selfaugment.trainer.policy.augmenter import BatchAugmenter
from selfaugment.trainer.policy.builtins import resolve_policy
from selfaugment.trainer.policy.model import AnyPolicy

MIN_CELL = 64
"""Cells are upscaled (nearest) by an integer factor to at least this many pixels."""
CELL_GAP = 2
"""White pixels between cells."""


def cell_scale(height: int, width: int) -> int:
    """Integer nearest-neighbour upscaling factor giving cells of at least MIN_CELL px."""
    return max(1, math.ceil(MIN_CELL / min(height, width)))


def render_policy_grid(
    policy: AnyPolicy | str,
    images: Tensor,
    path: str | Path,
    samples_per_image: int = 8,
    seed: int = 0,
    crop: bool = False,
) -> Path:
    """Write a PNG: one row per image, the original first, then ``samples_per_image``
    augmented samples (policy only, or with crop + flip when ``crop``). Returns the path."""
    check_images(images)
    if images.dtype != torch.uint8:
        raise TypeError(f"images: expected uint8 [N, C, H, W], got {images.dtype}")
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image: must be >= 1, got {samples_per_image}")
    count, channels, height, width = images.shape
    augmenter = BatchAugmenter(resolve_policy(policy), crop=crop, flip=crop)
    generator = torch.Generator().manual_seed(seed)
    repeated = images.cpu().repeat_interleave(samples_per_image, dim=0)
    augmented = augmenter(repeated, generator).mul_(255.0).round_().to(torch.uint8)
    augmented = augmented.view(count, samples_per_image, channels, height, width)
    rows = torch.cat([images.cpu().unsqueeze(1), augmented], dim=1)  # N x (1+S) x C x H x W
    scale = cell_scale(height, width)
    cell_h, cell_w = height * scale, width * scale
    columns = samples_per_image + 1
    canvas = np.full(
        (count * cell_h + (count - 1) * CELL_GAP, columns * cell_w + (columns - 1) * CELL_GAP, 3),
        255,
        dtype=np.uint8,
    )
    for row in range(count):
        for column in range(columns):
            cell = rows[row, column].permute(1, 2, 0).numpy()  # H x W x C
            cell = np.repeat(np.repeat(cell, scale, axis=0), scale, axis=1)
            top, left = row * (cell_h + CELL_GAP), column * (cell_w + CELL_GAP)
            canvas[top : top + cell_h, left : left + cell_w] = cell  # gray broadcasts to RGB
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(target, format="PNG")
    return target
