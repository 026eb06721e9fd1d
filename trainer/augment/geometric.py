"""Batched geometric ops and Cutout on [B, C, H, W] tensors, equal to ``augment/pil.py``.

Each geometric op builds one affine map per sample (PIL's ``data``: source x = a x + b y + c,
source y = d x + e y + f, in pixels) and resamples the whole batch with a single gather
from the images, each followed by one gray value that every source outside the image points
at. The source indices of a map are memoised (``source_index``): a policy with fixed
magnitudes uses a handful of maps, so after the first batches they are looked up.

The source pixel of each output pixel is computed with PIL's own arithmetic, so the result is
PIL's bit for bit (``Image.transform``/``Image.rotate`` with NEAREST, Pillow's Geometry.c):
maps without shear or rotation (identity, translations) step through ``a[2] + a[0] / 2``
in double precision, one ``+= a[0]`` per pixel, and truncate; all others go through 16.16
fixed point (``FIX(v) = floor(v * 65536 + 0.5)``, integer steps, ``>> 16``). A float32
evaluation of the same map takes a neighbouring pixel wherever the source coordinate lies
within about 1e-3 px of a pixel edge, which along a chain of ops (an Equalize after it) can
change many values. Rotation matrices are built as ``Image.rotate`` builds them, with
Python's ``math`` (so with the same C library as PIL's), one sample at a time. PIL falls
back to double precision for maps that reach beyond 32767 px; images that large are not
supported exactly. Works for uint8, float and level inputs alike (no arithmetic on the
values), on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import cast

import numpy as np
import torch
from torch import Tensor

from selfaugment.trainer.augment.pil import GRAY_FILL
from selfaugment.trainer.augment.tensor import arguments_of

AffineBuilder = Callable[[np.ndarray, int, int], np.ndarray]
"""float64 arguments [N], height, width -> PIL affine data [N, 6] (a, b, c, d, e, f), float64."""

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def gray_fill(images: Tensor) -> float:
    """The gray fill on the images' scale: 128 for uint8 and levels, 128/255 for [0, 1] floats."""
    return float(GRAY_FILL) if images.dtype == torch.uint8 else GRAY_FILL / 255.0


def _truncated_steps(start: np.ndarray, step: np.ndarray, count: int) -> np.ndarray:
    """PIL's COORD of ``start``, ``start + step``, ... accumulated one step at a time in
    double precision ([N, count]; -1 for negative positions)."""
    terms = np.concatenate([start[:, None], np.repeat(step[:, None], count - 1, axis=1)], axis=1)
    positions = np.add.accumulate(terms, axis=1)  # sequential, as the C loop adds
    return np.where(positions < 0.0, -1.0, np.trunc(positions)).astype(np.int64)


def _fix(values: np.ndarray) -> np.ndarray:
    """PIL's 16.16 fixed point: ``floor(v * 65536 + 0.5)``."""
    return np.floor(values * 65536.0 + 0.5).astype(np.int64)


def _source_index(data: np.ndarray, height: int, width: int) -> np.ndarray:
    """The source pixel of every output pixel, exactly as PIL's NEAREST affine transform finds
    it, as a flat index ``row * W + column`` [N, H * W] (int64, numpy); ``H * W`` (the fill
    value appended to each image) for sources outside the image."""
    count, outside = data.shape[0], height * width
    a, b, c, d, e, f = (data[:, i] for i in range(6))
    index = np.empty((count, height, width), dtype=np.int64)
    scaled = (b == 0.0) & (d == 0.0)
    if scaled.any():  # separable: one column per x and one line per y
        columns = _truncated_steps(c[scaled] + a[scaled] * 0.5, a[scaled], width)
        lines = _truncated_steps(f[scaled] + e[scaled] * 0.5, e[scaled], height)
        inside = ((lines >= 0) & (lines < height))[:, :, None] & (
            (columns >= 0) & (columns < width)
        )[:, None, :]
        index[scaled] = np.where(inside, lines[:, :, None] * width + columns[:, None, :], outside)
    if not scaled.all():
        fixed = ~scaled
        xs, ys = np.arange(width, dtype=np.int64), np.arange(height, dtype=np.int64)
        start_x = _fix(c[fixed] + a[fixed] * 0.5 + b[fixed] * 0.5)
        start_y = _fix(f[fixed] + d[fixed] * 0.5 + e[fixed] * 0.5)
        row_x = start_x[:, None] + _fix(b[fixed])[:, None] * ys  # [N, H]: integers, exact
        row_y = start_y[:, None] + _fix(e[fixed])[:, None] * ys
        column = np.right_shift(row_x[:, :, None] + _fix(a[fixed])[:, None, None] * xs, 16)
        line = np.right_shift(row_y[:, :, None] + _fix(d[fixed])[:, None, None] * xs, 16)
        inside = (column >= 0) & (column < width) & (line >= 0) & (line < height)
        index[fixed] = np.where(inside, line * width + column, outside)
    return index.reshape(count, height * width)


_INDEX_CACHE: dict[tuple[bytes, int, int], np.ndarray] = {}
_INDEX_CACHE_ENTRIES = 2048  # about 16 MiB at 32x32


def source_index(data: np.ndarray, height: int, width: int, device: torch.device) -> Tensor:
    """``_source_index`` of each sample [N, H * W] on ``device``, memoised per distinct map.

    A policy with fixed magnitudes has at most two maps per geometric op (the two signs), so
    after the first batches the indices are looked up, not computed; maps drawn at random
    magnitudes are computed in one vectorised call (the memo is emptied when it is full).
    """
    unique, inverse = np.unique(data, axis=0, return_inverse=True)
    keys = [(row.tobytes(), height, width) for row in unique]
    found = [_INDEX_CACHE.get(key) for key in keys]
    missing = [i for i, index in enumerate(found) if index is None]
    if missing:
        computed = _source_index(unique[missing], height, width)
        if len(_INDEX_CACHE) + len(missing) > _INDEX_CACHE_ENTRIES:
            _INDEX_CACHE.clear()
        for i, index in zip(missing, computed, strict=True):
            found[i] = index
            if len(_INDEX_CACHE) < _INDEX_CACHE_ENTRIES:
                _INDEX_CACHE[keys[i]] = index
    table = torch.from_numpy(np.stack(cast(list[np.ndarray], found))).to(device)
    if len(keys) == 1:
        return table.expand(data.shape[0], height * width)
    return table.index_select(0, torch.from_numpy(inverse.reshape(-1)).to(device))


def affine_nearest(images: Tensor, data: np.ndarray, fill: float | None = None) -> Tensor:
    """Resample each sample with its PIL affine data [B, 6] (NEAREST); pixels mapped from
    outside the image get ``fill`` (default: ``gray_fill(images)``)."""
    batch, channels, height, width = images.shape
    index = source_index(data, height, width, images.device)
    value = gray_fill(images) if fill is None else fill
    flat = torch.cat(  # each image followed by the fill value, which index H * W points at
        [images.reshape(batch, channels, height * width),
         images.new_full((1, 1, 1), value).expand(batch, channels, 1)], dim=2)  # fmt: skip
    sampled = flat.gather(2, index.view(batch, 1, height * width).expand(-1, channels, -1))
    return sampled.view(batch, channels, height, width)


def _rows(*columns: np.ndarray | float) -> np.ndarray:
    """Six columns (arrays [N] or constants) -> affine data [N, 6]."""
    count = max(np.size(column) for column in columns)
    return np.stack([np.broadcast_to(np.asarray(col, np.float64), count) for col in columns], 1)


def shear_x_matrices(shears: np.ndarray, height: int, width: int) -> np.ndarray:
    """Source x = x + shear * (y - H/2): shear along x about the centre."""
    return _rows(1.0, shears, -shears * height / 2, 0.0, 1.0, 0.0)


def shear_y_matrices(shears: np.ndarray, height: int, width: int) -> np.ndarray:
    """Source y = y + shear * (x - W/2): shear along y about the centre."""
    return _rows(1.0, 0.0, 0.0, shears, 1.0, -shears * width / 2)


def translate_x_matrices(fractions: np.ndarray, height: int, width: int) -> np.ndarray:
    """Content moves right by ``fraction * W`` pixels (left when negative)."""
    return _rows(1.0, 0.0, -fractions * width, 0.0, 1.0, 0.0)


def translate_y_matrices(fractions: np.ndarray, height: int, width: int) -> np.ndarray:
    """Content moves down by ``fraction * H`` pixels (up when negative)."""
    return _rows(1.0, 0.0, 0.0, 0.0, 1.0, -fractions * height)


def rotation_data(degrees: float, height: int, width: int) -> tuple[float, ...]:
    """The affine data of PIL's ``Image.rotate(degrees)`` (counter-clockwise about the centre,
    no expand), computed as Pillow computes it: the angle modulo 360, cosines rounded to 15
    decimals, the centre moved through the matrix."""
    angle = degrees % 360.0
    if angle == 0:
        return IDENTITY  # PIL returns a copy
    radians = -math.radians(angle)
    cos, sin = round(math.cos(radians), 15), round(math.sin(radians), 15)
    minus_sin = round(-math.sin(radians), 15)
    center_x, center_y = width / 2, height / 2
    offset_x = cos * -center_x + sin * -center_y + 0.0 + center_x
    offset_y = minus_sin * -center_x + cos * -center_y + 0.0 + center_y
    return cos, sin, offset_x, minus_sin, cos, offset_y


def rotate_matrices(angles_deg: np.ndarray, height: int, width: int) -> np.ndarray:
    """Counter-clockwise rotations about the centre, one ``rotation_data`` per sample."""
    data = [rotation_data(angle, height, width) for angle in np.asarray(angles_deg).tolist()]
    return np.array(data, dtype=np.float64).reshape(-1, 6)


def _affine_op(images: Tensor, arguments: Tensor | float, builder: AffineBuilder) -> Tensor:
    values = arguments_of(arguments, images).numpy()
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


def cutout_boxes(fractions: Tensor, centers: Tensor, height: int, width: int) -> Tensor:
    """Half-open boxes [N, 4] (left, top, right, bottom) of Fast AutoAugment's Cutout, float64.

    ``v = fraction * W``; the corner is ``floor(max(0, centre - v / 2))`` and the side
    ``floor(v) + 1`` pixels (``v > 0``; none at 0), clipped to the image: FAA draws a PIL
    rectangle from the corner to ``corner + v``, both ends included. ``pil.cutout_box`` is the
    same arithmetic on Python floats; here in numpy, on the CPU, as the numbers are few.
    """
    size = fractions.detach().cpu().numpy().astype(np.float64) * width
    side = np.where(size > 0, np.floor(size) + 1.0, 0.0)
    across, down = centers.detach().cpu().numpy().astype(np.float64).T
    left = np.floor(np.maximum(across - size / 2, 0.0))
    top = np.floor(np.maximum(down - size / 2, 0.0))
    right, bottom = np.minimum(left + side, width), np.minimum(top + side, height)
    return torch.from_numpy(np.stack([left, top, right, bottom], axis=1))


def fill_boxes_(images: Tensor, boxes: Tensor, fill: float) -> Tensor:
    """Set each sample's box [N, 4] (left, top, right, bottom; half-open) to ``fill``, in place.

    As arithmetic with a 0/1 mask built in numpy (``v * (1 - inside) + fill * inside``, exact):
    ``masked_fill`` and ``torch.where`` with a broadcast boolean mask are six times slower on
    the CPU, and a dozen torch calls on a few numbers cost more than the fill.
    """
    height, width = images.shape[2:]
    left, top, right, bottom = (column[:, None] for column in boxes.cpu().numpy().T)
    xs, ys = np.arange(width), np.arange(height)
    columns = ((xs >= left) & (xs < right))[:, None, None, :]  # [N, 1, 1, W]
    rows = ((ys >= top) & (ys < bottom))[:, None, :, None]  # [N, 1, H, 1]
    inside = torch.from_numpy(rows & columns).to(device=images.device, dtype=images.dtype)
    value = fill if images.is_floating_point() else int(fill)
    return images.mul_(1 - inside).add_(inside.mul_(value))


def fill_boxes(images: Tensor, boxes: Tensor, fill: float) -> Tensor:
    """``fill_boxes_`` on a copy."""
    return fill_boxes_(images.clone(), boxes, fill)


def cutout(
    images: Tensor,
    fractions: Tensor | float,
    generator: torch.Generator | None = None,
    centers: Tensor | None = None,
) -> Tensor:
    """Gray square of Fast AutoAugment's size (``cutout_boxes``) at ``centers`` [B, 2] (x, y
    in pixels; drawn uniformly over the image from ``generator`` when None)."""
    batch, _, height, width = images.shape
    values = arguments_of(fractions, images, "fractions")
    if centers is None:
        source = generator.device if generator is not None else torch.device("cpu")
        uniform = torch.rand((batch, 2), generator=generator, device=source).cpu().double()
        centers = uniform * torch.tensor([float(width), float(height)], dtype=torch.float64)
    return fill_boxes(images, cutout_boxes(values, centers, height, width), gray_fill(images))
