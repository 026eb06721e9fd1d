"""RandomResizedCrop and horizontal flip for MoCo views: batched (tensor) and per image (PIL).

Box sampling follows torchvision's ``RandomResizedCrop.get_params``: up to 10 attempts
of (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)); when none fits, a centre
crop with the aspect ratio clamped to ``ratio``. The batched version draws all attempts
for all samples at once and resamples each box to the full size with bilinear
interpolation (one ``grid_sample`` on a separable grid; the flip is a negative x scale).
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.nn import functional

from selfaugment.trainer.augment.ops import CROP_RATIO, CROP_SCALE

_ATTEMPTS = 10
_DRAWS = 2 * _ATTEMPTS + 2  # area and ratio per attempt, then top and left


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's fallback crop size (height, width): whole image, ratio clamped."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return round(width / min(ratio)), width
    if in_ratio > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def crop_boxes_from_uniform(
    uniform: np.ndarray,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> np.ndarray:
    """Boxes [B, 4] (top, left, box height, box width) from uniform numbers [B, 22]."""
    attempts = uniform[:, :_ATTEMPTS], uniform[:, _ATTEMPTS : 2 * _ATTEMPTS]
    area = (scale[0] + (scale[1] - scale[0]) * attempts[0]) * (height * width)
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = np.exp(log_low + (log_high - log_low) * attempts[1])
    box_w = np.round(np.sqrt(area * aspect))  # round half to even, like Python's round
    box_h = np.round(np.sqrt(area / aspect))
    fits = (box_w > 0) & (box_w <= width) & (box_h > 0) & (box_h <= height)
    first = fits.argmax(axis=1)  # index of the first fitting attempt
    any_fit = fits.any(axis=1)
    rows = np.arange(len(uniform))
    fallback_h, fallback_w = _fallback_box(height, width, ratio)
    box_h = np.where(any_fit, box_h[rows, first], fallback_h)
    box_w = np.where(any_fit, box_w[rows, first], fallback_w)
    top = np.floor(uniform[:, 2 * _ATTEMPTS] * (height - box_h + 1))
    left = np.floor(uniform[:, 2 * _ATTEMPTS + 1] * (width - box_w + 1))
    top = np.where(any_fit, top, (height - fallback_h) // 2)
    left = np.where(any_fit, left, (width - fallback_w) // 2)
    return np.stack([top, left, box_h, box_w], axis=1)


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Boxes [B, 4] as (top, left, box height, box width) in pixels (float32, CPU)."""
    uniform = _uniform((batch, _DRAWS), generator)
    return torch.from_numpy(crop_boxes_from_uniform(uniform, height, width, scale, ratio)).float()


def _uniform(shape: tuple[int, int], generator: torch.Generator | None) -> np.ndarray:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device).cpu().double().numpy()


def sampling_grid(
    boxes: np.ndarray, flips: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """The crop's normalised sampling positions (align_corners=False) of the output pixel
    centres, float32: x [B, W] and y [B, H] (the grid is separable).

    Built in numpy (a few hundred numbers, where torch calls cost more); the compiled path
    (``augment/kernels.py``) reads the same two arrays, so both resample at the same positions.
    """
    top, left, box_h, box_w = np.asarray(boxes).astype(np.float32).T
    mirror = 1.0 - 2.0 * np.asarray(flips).astype(np.float32)
    unit_x = (np.arange(width, dtype=np.float32) + 0.5) * (2.0 / width) - 1.0
    unit_y = (np.arange(height, dtype=np.float32) + 0.5) * (2.0 / height) - 1.0
    grid_x = (box_w * mirror / width)[:, None] * unit_x + ((2 * left + box_w) / width - 1)[:, None]
    grid_y = (box_h / height)[:, None] * unit_y + ((2 * top + box_h) / height - 1)[:, None]
    return grid_x, grid_y


def resized_crop_flip(images: Tensor, boxes: Tensor, flips: Tensor) -> Tensor:
    """Resample each box of float ``images`` to full size (bilinear), mirrored where ``flips``."""
    batch, _, height, width = images.shape
    grid_x, grid_y = sampling_grid(
        boxes.detach().cpu().numpy(), flips.detach().cpu().numpy(), height, width
    )
    # Written in two broadcast copies (as fast as a torch.cat of expanded views, with two
    # torch calls fewer).
    grid = np.empty((batch, height, width, 2), dtype=np.float32)
    grid[..., 0] = grid_x[:, None, :]
    grid[..., 1] = grid_y[:, :, None]
    return functional.grid_sample(
        images,
        torch.from_numpy(grid).to(images.device),
        mode="bilinear",
        padding_mode="border",
        align_corners=False,
    )


def crop_flip_draws(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator | None,
    crop: bool,
    flip: bool,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [B, 4] and flips [B] (bool) of ``random_resized_crop_flip``, drawn from
    ``generator`` (one call, the same draws whatever is enabled; call only when crop or flip)."""
    uniform = _uniform((batch, _DRAWS + 1), generator)
    if crop:
        boxes = crop_boxes_from_uniform(uniform[:, :_DRAWS], height, width, scale, ratio)
    else:
        boxes = np.tile([0.0, 0.0, float(height), float(width)], (batch, 1))
    flips = uniform[:, _DRAWS] < 0.5 if flip else np.zeros(batch, dtype=bool)
    return boxes, flips


def random_resized_crop_flip(
    images: Tensor,
    generator: torch.Generator | None = None,
    crop: bool = True,
    flip: bool = True,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> Tensor:
    """Per-sample random resized crop and/or horizontal flip (p = 1/2) of a float batch."""
    batch, _, height, width = images.shape
    if not crop and not flip:
        return images
    boxes, flips = crop_flip_draws(batch, height, width, generator, crop, flip, scale, ratio)
    return resized_crop_flip(images, torch.from_numpy(boxes), torch.from_numpy(flips))


def random_resized_crop_flip_pil(
    image: Image.Image,
    rng: random.Random,
    crop: bool = True,
    flip: bool = True,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> Image.Image:
    """Per-image reference of ``random_resized_crop_flip`` (PIL bilinear resize)."""
    width, height = image.size
    if crop:
        box_h, box_w = _fallback_box(height, width, ratio)
        top, left = (height - box_h) // 2, (width - box_w) // 2
        for _ in range(_ATTEMPTS):
            area = rng.uniform(*scale) * height * width
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            candidate_w = round(math.sqrt(area * aspect))
            candidate_h = round(math.sqrt(area / aspect))
            if 0 < candidate_w <= width and 0 < candidate_h <= height:
                box_h, box_w = candidate_h, candidate_w
                top = rng.randint(0, height - box_h)
                left = rng.randint(0, width - box_w)
                break
        box = (left, top, left + box_w, top + box_h)
        image = image.resize((width, height), Image.Resampling.BILINEAR, box=box)
    if flip and rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image
