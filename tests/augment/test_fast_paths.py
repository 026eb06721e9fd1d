"""The fast paths of the batched ops give the values of the plain ones, on batches large enough
to take them (the PIL comparisons of ``test_ops.py`` use batches below one chunk).

- Multi-pass colour ops run chunk by chunk of samples (``levels.chunks``): on a batch of
  several chunks they equal the same op applied to each sample alone, value for value.
- Equalize takes PIL's integer quotient as the floor of a float64 quotient: equal to PIL on
  the histograms where that could go wrong (flat, two-level, large images).
- The crop's sampling grid, built in float32 from one row and one column per sample: at
  power-of-two sizes every weight and product is a short binary fraction, so the result is
  exactly bilinear interpolation computed in float64 by hand.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from PIL import Image

from selfaugment.trainer.augment import levels, pil, tables
from selfaugment.trainer.augment.crop import resized_crop_flip, sample_crop_boxes

SIZE = 32


def _batch(count: int, seed: int) -> torch.Tensor:
    """Whole levels [count, 3, 32, 32]: random values, and every fourth image smooth."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, SIZE, SIZE), generator=generator).float()
    ramp = torch.linspace(0.0, 255.0, SIZE).round()
    images[::4] = (ramp.view(1, 1, SIZE) + ramp.view(1, SIZE, 1)).div(2).floor().expand(3, -1, -1)
    return images


def test_a_batch_spans_several_chunks() -> None:
    """The batches below are split (else these tests would not reach the chunked path)."""
    batch = _batch(100, 0)
    assert len(list(levels.chunks(batch, torch.ones(100, 1, 1, 1)))) >= 3


FACTORS = torch.tensor([0.1, 0.55, 1.0, 1.45, 1.9], dtype=torch.float64)


def _per_sample(
    op: Callable[..., torch.Tensor], images: torch.Tensor, *per_sample: torch.Tensor
) -> torch.Tensor:
    """``op`` on each sample alone (a batch of one is a single chunk), concatenated."""
    return torch.cat(
        [op(image[None].clone(), *(values[i : i + 1] for values in per_sample))
         for i, image in enumerate(images)]
    )  # fmt: skip


@pytest.mark.parametrize("op", [levels.brightness, levels.color, levels.contrast, levels.sharpness])
def test_chunked_blends_equal_each_sample_alone(op: Callable[..., torch.Tensor]) -> None:
    images = _batch(100, 1)
    factors = FACTORS.repeat(20)
    assert torch.equal(op(images.clone(), factors), _per_sample(op, images, factors))


def test_chunked_fused_blend_equals_each_sample_alone() -> None:
    images = _batch(120, 2)
    factors = FACTORS.repeat(24)
    gray_weights = torch.tensor([0.0, 1.0, 0.0] * 40, dtype=torch.float64)
    mean_weights = torch.tensor([0.0, 0.0, 1.0] * 40, dtype=torch.float64)
    arguments = (factors, gray_weights, mean_weights)
    fused = levels.blend_with_gray(images.clone(), *arguments)
    assert torch.equal(fused, _per_sample(levels.blend_with_gray, images, *arguments))


def test_chunked_blend_with_a_scalar_or_per_sample_degenerate() -> None:
    images = _batch(100, 3)
    factors = FACTORS.repeat(20)
    means = torch.arange(100, dtype=torch.float32).mul(2.5).floor().view(100, 1, 1, 1)
    by_sample = levels.blend(means, images.clone(), factors)
    alone = [levels.blend(means[i : i + 1], images[i : i + 1].clone(), factors[i : i + 1])
             for i in range(100)]  # fmt: skip
    assert torch.equal(by_sample, torch.cat(alone))
    scalar = levels.blend(77.0, images.clone(), factors)
    assert torch.equal(
        scalar, levels.blend(torch.full((100, 1, 1, 1), 77.0), images.clone(), factors)
    )


def _equalize_pil(images: torch.Tensor) -> torch.Tensor:
    outputs = []
    for image in images.to(torch.uint8):
        result = pil.equalize(Image.fromarray(image.permute(1, 2, 0).numpy()), 0.0, None)
        outputs.append(torch.from_numpy(np.asarray(result).copy()).permute(2, 0, 1))
    return torch.stack(outputs).float()


@pytest.mark.parametrize("size", [1, 7, 32, 300])
def test_equalize_equals_pil_on_hard_histograms(size: int) -> None:
    """Flat channels (identity), one odd pixel, two levels, a level that holds most pixels,
    random values; at 300x300 the quotient's numerators are large."""
    generator = torch.Generator().manual_seed(size)
    flat = torch.full((3, size, size), 91.0)
    odd = flat.clone()
    odd[:, 0, 0] = 4.0
    two = torch.randint(0, 2, (3, size, size), generator=generator).float() * 200 + 20
    mostly = torch.full((3, size, size), 250.0)
    mostly[:, : size // 3] = torch.randint(
        0, 256, (3, size // 3, size), generator=generator
    ).float()
    noise = torch.randint(0, 256, (3, size, size), generator=generator).float()
    images = torch.stack([flat, odd, two, mostly, noise])
    assert torch.equal(tables.equalize(images.clone()), _equalize_pil(images))


def _bilinear_by_hand(images: np.ndarray, boxes: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Bilinear resampling of each box to full size (pixel centres, edges clamped), float64."""
    count, _, height, width = images.shape
    outputs = np.empty_like(images)
    for index in range(count):
        top, left, box_h, box_w = boxes[index]
        ys = np.clip(top + (np.arange(height) + 0.5) * box_h / height - 0.5, 0, height - 1)
        xs = np.clip(left + (np.arange(width) + 0.5) * box_w / width - 0.5, 0, width - 1)
        if flips[index]:
            xs = xs[::-1]
        y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
        y1, x1 = np.minimum(y0 + 1, height - 1), np.minimum(x0 + 1, width - 1)
        fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
        image = images[index]
        top_row = image[:, y0][:, :, x0] * (1 - fx) + image[:, y0][:, :, x1] * fx
        bottom_row = image[:, y1][:, :, x0] * (1 - fx) + image[:, y1][:, :, x1] * fx
        outputs[index] = top_row * (1 - fy) + bottom_row * fy
    return outputs


def test_crop_is_exact_bilinear_interpolation_at_power_of_two_sizes() -> None:
    images = _batch(64, 4)
    generator = torch.Generator().manual_seed(4)
    boxes = sample_crop_boxes(64, SIZE, SIZE, generator=generator)
    flips = torch.rand(64, generator=generator) < 0.5
    cropped = resized_crop_flip(images, boxes, flips)
    expected = _bilinear_by_hand(images.double().numpy(), boxes.double().numpy(), flips.numpy())
    assert np.array_equal(cropped.double().numpy(), expected)
