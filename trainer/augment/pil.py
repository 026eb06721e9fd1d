"""Per-image PIL reference implementation of the 15 augmentation ops.

Readable, one image at a time, built on PIL's own ``ImageOps``/``ImageEnhance``. The
batched ops (``augment/levels.py``, ``augment/geometric.py``) are tested against these
functions, op by op and along whole chains of ops.

Every op has the signature ``op(image, argument, rng=None) -> image`` where ``argument``
is the op's own unit (degrees, shear, enhance factor, bits, ...; see ``ops.OPS``). Only
Cutout uses ``rng`` (for the square's centre). Conventions shared with the batched ops
(docs/concepts.md, "Semantics against Fast AutoAugment", says why each one is what it is):

- geometric ops sample with NEAREST at output pixel centres, fill uncovered pixels gray
  (``GRAY_FILL`` = 128) and shear/rotate about the image centre. Fast AutoAugment shears
  about the top-left corner, which adds a shift of ``shear * height / 2``, and fills black;
- positive translate moves the content right/down; positive rotate is counter-clockwise;
- Posterize truncates the bit count and Cutout's square is ``floor(v) + 1`` pixels wide for
  ``v = fraction * width``, both as in Fast AutoAugment; Cutout fills gray, not FAA's
  CIFAR-10 mean colour.
"""

from __future__ import annotations

import math
import random

from PIL import Image, ImageEnhance, ImageOps

GRAY_FILL = 128
"""Fill value (uint8 scale) for pixels uncovered by geometric ops and for Cutout."""


def fill_color(image: Image.Image) -> int | tuple[int, ...]:
    """Gray fill in the image's mode (an int for 'L', a tuple for multi-band modes)."""
    bands = len(image.getbands())
    return GRAY_FILL if bands == 1 else (GRAY_FILL,) * bands


def _affine(image: Image.Image, matrix: tuple[float, ...]) -> Image.Image:
    """Output pixel (x, y) samples input at matrix @ (x + .5, y + .5, 1), NEAREST, gray fill."""
    return image.transform(
        image.size,
        Image.Transform.AFFINE,
        matrix,
        resample=Image.Resampling.NEAREST,
        fillcolor=fill_color(image),
    )


def shear_x(image: Image.Image, shear: float, rng: random.Random | None = None) -> Image.Image:
    """Shear along x about the image centre: input x = x + shear * (y - H/2)."""
    return _affine(image, (1.0, shear, -shear * image.height / 2, 0.0, 1.0, 0.0))


def shear_y(image: Image.Image, shear: float, rng: random.Random | None = None) -> Image.Image:
    """Shear along y about the image centre: input y = y + shear * (x - W/2)."""
    return _affine(image, (1.0, 0.0, 0.0, shear, 1.0, -shear * image.width / 2))


def translate_x(
    image: Image.Image, fraction: float, rng: random.Random | None = None
) -> Image.Image:
    """Move the content right by ``fraction * width`` pixels (left when negative)."""
    return _affine(image, (1.0, 0.0, -fraction * image.width, 0.0, 1.0, 0.0))


def translate_y(
    image: Image.Image, fraction: float, rng: random.Random | None = None
) -> Image.Image:
    """Move the content down by ``fraction * height`` pixels (up when negative)."""
    return _affine(image, (1.0, 0.0, 0.0, 0.0, 1.0, -fraction * image.height))


def rotate(image: Image.Image, degrees: float, rng: random.Random | None = None) -> Image.Image:
    """Rotate counter-clockwise about the centre (PIL ``Image.rotate``, NEAREST)."""
    return image.rotate(degrees, resample=Image.Resampling.NEAREST, fillcolor=fill_color(image))


def auto_contrast(
    image: Image.Image, argument: float = 0.0, rng: random.Random | None = None
) -> Image.Image:
    """Stretch each channel so that its min maps to 0 and its max to 255."""
    return ImageOps.autocontrast(image)


def equalize(
    image: Image.Image, argument: float = 0.0, rng: random.Random | None = None
) -> Image.Image:
    """Equalise each channel's histogram."""
    return ImageOps.equalize(image)


def invert(
    image: Image.Image, argument: float = 0.0, rng: random.Random | None = None
) -> Image.Image:
    """255 - value."""
    return ImageOps.invert(image)


def solarize(image: Image.Image, threshold: float, rng: random.Random | None = None) -> Image.Image:
    """Invert the values at or above ``threshold`` (256 leaves the image unchanged)."""
    return ImageOps.solarize(image, threshold)  # type: ignore[arg-type]  # float threshold is fine


def posterize_bits(bits: float) -> int:
    """Bits kept for a continuous bit count (8 = identity): truncated, as Fast AutoAugment's
    ``int(v)``, within [1, 8]. So any magnitude above 0 removes at least one bit."""
    return min(8, max(1, math.floor(bits)))


def posterize(image: Image.Image, bits: float, rng: random.Random | None = None) -> Image.Image:
    """Keep the ``posterize_bits(bits)`` most significant bits of each value."""
    return ImageOps.posterize(image, posterize_bits(bits))


def contrast(image: Image.Image, factor: float, rng: random.Random | None = None) -> Image.Image:
    """Blend with the mean of the grayscale image (factor 1 = identity, 0 = flat gray)."""
    return ImageEnhance.Contrast(image).enhance(factor)


def color(image: Image.Image, factor: float, rng: random.Random | None = None) -> Image.Image:
    """Blend with the grayscale image (factor 1 = identity, 0 = grayscale)."""
    return ImageEnhance.Color(image).enhance(factor)


def brightness(image: Image.Image, factor: float, rng: random.Random | None = None) -> Image.Image:
    """Blend with black (factor 1 = identity, 0 = black)."""
    return ImageEnhance.Brightness(image).enhance(factor)


def sharpness(image: Image.Image, factor: float, rng: random.Random | None = None) -> Image.Image:
    """Blend with PIL's SMOOTH-filtered image (factor < 1 blurs, > 1 sharpens)."""
    return ImageEnhance.Sharpness(image).enhance(factor)


def cutout_box(
    center: tuple[float, float], fraction: float, width: int, height: int
) -> tuple[int, int, int, int]:
    """Half-open box (x0, y0, x1, y1) of Fast AutoAugment's Cutout, clipped to the image.

    With ``v = fraction * width``: the corner is ``floor(max(0, centre - v / 2))`` and the side
    ``floor(v) + 1`` pixels (none when ``v == 0``); FAA draws a PIL rectangle from the corner
    to ``corner + v`` with both ends included. ``geometric.cutout_boxes`` is the same, batched.
    """
    size = fraction * width
    side = math.floor(size) + 1 if size > 0 else 0
    x0 = math.floor(max(0.0, center[0] - size / 2))
    y0 = math.floor(max(0.0, center[1] - size / 2))
    return x0, y0, min(width, x0 + side), min(height, y0 + side)


def cutout(
    image: Image.Image,
    fraction: float,
    rng: random.Random | None = None,
    center: tuple[float, float] | None = None,
) -> Image.Image:
    """Fill a gray square (``cutout_box``) at ``center`` (pixels; uniform over the image if None)."""
    if fraction <= 0:
        return image.copy()
    if center is None:
        uniform = rng.uniform if rng is not None else random.uniform
        center = (uniform(0, image.width), uniform(0, image.height))
    result = image.copy()
    result.paste(fill_color(image), cutout_box(center, fraction, image.width, image.height))
    return result
