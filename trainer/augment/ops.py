"""The table of augmentation ops: the single source of op names, ranges and functions.

Each record maps a magnitude ``lambda`` in [0, 1] to the op's argument, monotone in
strength: ``argument = identity + sign * lambda * (max_argument - identity)``, so
``lambda = 0`` is the identity and ``lambda = 1`` the strongest setting. For signed ops
the sign (+1 or -1) is separate from lambda: drawn with probability 1/2 at each application,
unless the policy's op entry fixes a ``direction``. Fast AutoAugment maps its level to
[-max, +max] (0.5 is the identity) and mirrors geometric ops at random, while for the
enhance ops its level sets the direction; ``policy/faa.py`` converts between the two.

Ranges are Fast AutoAugment's (Lim et al. 2019), used by SelfAugment (Reed et al. 2021,
Appendix B / dissertation chapter 2): shear 0..0.3, translate 0..0.45 x size, rotate
0..30 degrees, Solarize threshold 256..0, Posterize 8..4 bits (truncated), enhance factor
1 +- 0.9, Cutout side 0..0.2 x width (``floor(v) + 1`` pixels, as FAA draws it).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from PIL import Image
from torch import Tensor

from selfaugment.trainer.augment import geometric, levels, pil, tables
from selfaugment.trainer.augment import tensor as colour
from selfaugment.trainer.augment.geometric import AffineBuilder
from selfaugment.trainer.augment.tensor import LevelOp

PilOp = Callable[[Image.Image, float, random.Random | None], Image.Image]
TensorOp = Callable[[Tensor, Tensor | float, torch.Generator | None], Tensor]
Number = TypeVar("Number", float, Tensor)


@dataclass(frozen=True)
class OpSpec:
    """One augmentation op: how magnitude maps to its argument, and its two implementations."""

    name: str
    has_magnitude: bool
    signed: bool
    identity_argument: float
    max_argument: float
    unit: str
    pil: PilOp
    tensor: TensorOp
    """The batched op on uint8 or [0, 1] float images (equal to ``pil``; public API)."""
    levels: LevelOp | None = None
    """Colour ops: the exact op on float32 levels that ``BatchAugmenter`` chains."""
    affine: AffineBuilder | None = None
    """Geometric ops: arguments [N] -> inverse maps [N, 2, 3]; lets ``BatchAugmenter``
    resample all samples of all geometric ops at one plan position in one call."""
    blend: tuple[float, float] | None = None
    """Brightness/Color/Contrast: (gray, mean) weights of ``blend_with_gray``; fused the same way."""

    def argument(self, magnitude: Number, sign: Number | float = 1.0) -> Number:
        """Op argument for magnitude in [0, 1] (floats or tensors); sign is used if signed."""
        span = (self.max_argument - self.identity_argument) * magnitude
        if self.signed:
            span = span * sign
        return span + self.identity_argument


def _spec(
    name: str,
    signed: bool,
    identity: float,
    maximum: float,
    unit: str,
    pil_op: PilOp,
    tensor_op: TensorOp,
    **fused: Any,
) -> OpSpec:
    return OpSpec(name, True, signed, identity, maximum, unit, pil_op, tensor_op, **fused)


def _no_magnitude(name: str, pil_op: PilOp, tensor_op: TensorOp, level_op: LevelOp) -> OpSpec:
    return OpSpec(name, False, False, 0.0, 0.0, "-", pil_op, tensor_op, levels=level_op)


# fmt: off
OPS: dict[str, OpSpec] = {spec.name: spec for spec in (
    # name, signed, identity argument, max argument, unit, PIL reference, batched op
    _spec("ShearX", True, 0.0, 0.3, "shear", pil.shear_x, geometric.shear_x,
          affine=geometric.shear_x_matrices),
    _spec("ShearY", True, 0.0, 0.3, "shear", pil.shear_y, geometric.shear_y,
          affine=geometric.shear_y_matrices),
    _spec("TranslateX", True, 0.0, 0.45, "x width", pil.translate_x, geometric.translate_x,
          affine=geometric.translate_x_matrices),
    _spec("TranslateY", True, 0.0, 0.45, "x height", pil.translate_y, geometric.translate_y,
          affine=geometric.translate_y_matrices),
    _spec("Rotate", True, 0.0, 30.0, "degrees", pil.rotate, geometric.rotate,
          affine=geometric.rotate_matrices),
    _no_magnitude("AutoContrast", pil.auto_contrast, colour.auto_contrast, tables.auto_contrast),
    _no_magnitude("Equalize", pil.equalize, colour.equalize, tables.equalize),
    _no_magnitude("Invert", pil.invert, colour.invert, levels.invert),
    _spec("Solarize", False, 256.0, 0.0, "threshold", pil.solarize, colour.solarize,
          levels=tables.solarize),
    _spec("Posterize", False, 8.0, 4.0, "bits", pil.posterize, colour.posterize,
          levels=levels.posterize),
    _spec("Contrast", True, 1.0, 1.9, "factor", pil.contrast, colour.contrast,
          levels=levels.contrast, blend=(0.0, 1.0)),
    _spec("Color", True, 1.0, 1.9, "factor", pil.color, colour.color,
          levels=levels.color, blend=(1.0, 0.0)),
    _spec("Brightness", True, 1.0, 1.9, "factor", pil.brightness, colour.brightness,
          levels=levels.brightness, blend=(0.0, 0.0)),
    _spec("Sharpness", True, 1.0, 1.9, "factor", pil.sharpness, colour.sharpness,
          levels=levels.sharpness),
    _spec("Cutout", False, 0.0, 0.2, "x width", pil.cutout, geometric.cutout),
)}
# fmt: on
"""Op name -> record, in the paper's order of families (geometric, colour, Cutout)."""

OP_NAMES: tuple[str, ...] = tuple(OPS)
"""All op names; the index of a name here is its id in batched augmentation plans."""

CROP_SCALE: tuple[float, float] = (0.2, 1.0)
"""Area range of RandomResizedCrop for MoCo views (MoCo v2, arXiv:2003.04297)."""

CROP_RATIO: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
"""Aspect-ratio range of RandomResizedCrop (torchvision default)."""


def get_op(name: str) -> OpSpec:
    """The record of ``name``; KeyError listing the valid names when unknown."""
    try:
        return OPS[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; valid ops: {', '.join(OP_NAMES)}") from None
