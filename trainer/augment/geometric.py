"""Batched geometric ops and Cutout on [B, C, H, W] tensors, matching ``augment/pil.py``.

Each geometric op builds one inverse affine matrix per sample in pixel units and resamples
the whole batch with a single gather: output pixel (x, y) takes the input pixel
``floor(M @ (x + 0.5, y + 0.5, 1))``, or gray (128) when that falls outside the image.
This is exactly PIL's NEAREST rule for ``Image.transform``/``Image.rotate``. We use our
own gather rather than ``grid_sample(mode="nearest")``, which rounds half to even at ties
and fills with zeros. Uncovered pixels read a one-pixel gray border. PIL computes the coordinates in 16.16 fixed point and we compute
them in float32, so pixels whose source coordinate lies within ~1e-3 px of a pixel edge
can take the neighbouring pixel (see the tolerances in ``tests/augment/test_ops.py``). Works for
uint8 and float inputs alike (no arithmetic on the values), on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn import functional

from selfaugment.trainer.augment.pil import GRAY_FILL
from selfaugment.trainer.augment.tensor import per_sample


def _fill_value(images: Tensor) -> float:
    return float(GRAY_FILL) if images.dtype == torch.uint8 else GRAY_FILL / 255.0


def _random(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform [0, 1) numbers drawn on the generator's device (CPU without one), moved."""
    source = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=source).to(device)


def affine_nearest(images: Tensor, matrices: Tensor) -> Tensor:
    """Resample with per-sample inverse maps ``matrices`` [B, 2, 3] (pixel units), gray fill."""
    batch, channels, height, width = images.shape
    device = images.device
    matrix = matrices.to(device=device, dtype=torch.float32).view(batch, 2, 3, 1, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).add_(0.5).view(1, 1, width)
    ys = torch.arange(height, device=device, dtype=torch.float32).add_(0.5).view(1, height, 1)
    # Source pixel per output pixel (BxHxW); a one-pixel gray border catches every source
    # outside the image once coordinates are clamped to [-1, size], so no mask is needed.
    source_x = (matrix[:, 0, 0] * xs + matrix[:, 0, 1] * ys).add_(matrix[:, 0, 2])
    source_y = (matrix[:, 1, 0] * xs + matrix[:, 1, 1] * ys).add_(matrix[:, 1, 2])
    column = source_x.floor_().clamp_(-1, width).add_(1)
    row = source_y.floor_().clamp_(-1, height).add_(1)
    index = row.mul_(width + 2).add_(column).to(torch.int64).view(batch, 1, height * width)
    padded = functional.pad(images, (1, 1, 1, 1), value=_fill_value(images))
    flat = padded.view(batch, channels, (height + 2) * (width + 2))
    sampled = flat.gather(2, index.expand(batch, channels, height * width))
    return sampled.view(batch, channels, height, width)


def _stack(entries: list[Tensor]) -> Tensor:
    """Six [N] tensors (row-major a, b, c, d, e, f) -> matrices [N, 2, 3]."""
    return torch.stack(entries, dim=1).view(-1, 2, 3)


def shear_x_matrices(shears: Tensor, height: int, width: int) -> Tensor:
    """Source x = x + shear * (y - H/2): shear along x about the centre."""
    zero, one = torch.zeros_like(shears), torch.ones_like(shears)
    return _stack([one, shears, -shears * (height / 2), zero, one, zero])


def shear_y_matrices(shears: Tensor, height: int, width: int) -> Tensor:
    """Source y = y + shear * (x - W/2): shear along y about the centre."""
    zero, one = torch.zeros_like(shears), torch.ones_like(shears)
    return _stack([one, zero, zero, shears, one, -shears * (width / 2)])


def translate_x_matrices(fractions: Tensor, height: int, width: int) -> Tensor:
    """Content moves right by ``fraction * W`` pixels (left when negative)."""
    zero, one = torch.zeros_like(fractions), torch.ones_like(fractions)
    return _stack([one, zero, -fractions * width, zero, one, zero])


def translate_y_matrices(fractions: Tensor, height: int, width: int) -> Tensor:
    """Content moves down by ``fraction * H`` pixels (up when negative)."""
    zero, one = torch.zeros_like(fractions), torch.ones_like(fractions)
    return _stack([one, zero, zero, zero, one, -fractions * height])


def rotate_matrices(angles_deg: Tensor, height: int, width: int) -> Tensor:
    """Counter-clockwise rotation about the centre, as PIL ``Image.rotate`` builds it."""
    radians = angles_deg.double() * (-math.pi / 180.0)
    cos, sin = radians.cos(), radians.sin()
    center_x, center_y = width / 2, height / 2
    offset_x = -cos * center_x - sin * center_y + center_x
    offset_y = sin * center_x - cos * center_y + center_y
    return _stack([cos, sin, offset_x, -sin, cos, offset_y]).float()


def _affine_op(
    images: Tensor, arguments: Tensor | float, builder: Callable[[Tensor, int, int], Tensor]
) -> Tensor:
    values = per_sample(arguments, images).view(-1)
    return affine_nearest(images, builder(values, images.shape[2], images.shape[3]))


def shear_x(
    images: Tensor, shears: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Shear along x about the centre: source x = x + shear * (y - H/2)."""
    return _affine_op(images, shears, shear_x_matrices)


def shear_y(
    images: Tensor, shears: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Shear along y about the centre: source y = y + shear * (x - W/2)."""
    return _affine_op(images, shears, shear_y_matrices)


def translate_x(
    images: Tensor, fractions: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Move the content right by ``fraction * W`` pixels (left when negative)."""
    return _affine_op(images, fractions, translate_x_matrices)


def translate_y(
    images: Tensor, fractions: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Move the content down by ``fraction * H`` pixels (up when negative)."""
    return _affine_op(images, fractions, translate_y_matrices)


def rotate(
    images: Tensor, angles_deg: Tensor | float, generator: torch.Generator | None = None
) -> Tensor:
    """Rotate counter-clockwise about the centre by ``angles_deg`` (PIL ``Image.rotate``)."""
    return _affine_op(images, angles_deg, rotate_matrices)


def cutout(
    images: Tensor,
    fractions: Tensor | float,
    generator: torch.Generator | None = None,
    centers: Tensor | None = None,
) -> Tensor:
    """Gray square of side ``round(fraction * W)`` at ``centers`` [B, 2] (x, y pixels; random)."""
    batch, _, height, width = images.shape
    device = images.device
    side = per_sample(fractions, images).view(-1).mul(width).add_(0.5).floor_().clamp_(min=0)
    if centers is None:
        centers = _random((batch, 2), generator, device) * torch.tensor(
            [float(width), float(height)], device=device
        )
    centers = centers.to(device=device, dtype=torch.float32)
    left = (centers[:, 0] - side / 2).floor_().clamp_(min=0).view(batch, 1)
    top = (centers[:, 1] - side / 2).floor_().clamp_(min=0).view(batch, 1)
    xs = torch.arange(width, device=device, dtype=torch.float32).view(1, width)
    ys = torch.arange(height, device=device, dtype=torch.float32).view(1, height)
    columns = ((xs >= left) & (xs < left + side.view(batch, 1))).view(batch, 1, 1, width)
    rows = ((ys >= top) & (ys < top + side.view(batch, 1))).view(batch, 1, height, 1)
    fill = _fill_value(images)
    if images.dtype == torch.uint8:
        return images.masked_fill(rows & columns, fill)
    inside = rows.float() * columns.float()  # Bx1xHxW, 1 inside the square
    values = images if images.dtype == torch.float32 else images.float()
    filled = torch.lerp(values, torch.tensor(fill, device=device), inside)
    return filled.to(images.dtype)
