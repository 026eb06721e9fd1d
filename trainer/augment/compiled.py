"""The compiled CPU path of ``BatchAugmenter``: which path runs, and the glue to the kernels.

Two paths augment a batch, with the same result to the last bit:

- the eager path (torch ops over the whole batch, ``policy/apply.py``): float inputs, CUDA
  tensors, and CPU uint8 batches when numba is not installed (or, on a CPU where neither way
  of rounding reproduces torch's ``grid_sample``, see ``crop_arithmetic``);
- the compiled path (``augment/kernels.py``, numba): CPU uint8 batches. Every random draw is
  made exactly as the eager path makes it (the same generator calls in the same order, in
  torch and numpy); only the pixel work moves into one compiled loop over the samples, which
  runs crop, flip and every op of a sample while it sits in the L1 cache.

``SELFAUGMENT_AUGMENT_KERNELS`` forces one: ``torch`` (the eager path), ``numba`` (an error
when numba cannot be imported), or ``auto`` (the default: numba when it imports). Compiled
kernels are cached on disk (``cache=True``) under ``NUMBA_CACHE_DIR`` when the user set it,
else ``$SELFAUGMENT_CACHE/numba`` (``~/.cache/selfaugment/numba``): writable in containers
that run as a non-root user from a read-only source tree, where numba's default (a
``__pycache__`` beside the source) is not. This module imports numba only when a batch takes
the compiled path, so importing the augmenter never needs it (the operator's image installs
no numba).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import Tensor

from selfaugment.trainer.augment.crop import crop_flip_draws, resized_crop_flip, sampling_grid
from selfaugment.trainer.augment.levels import MAX_LEVEL
from selfaugment.trainer.augment.ops import OP_NAMES, OPS

logger = logging.getLogger(__name__)

KERNELS_VARIABLE = "SELFAUGMENT_AUGMENT_KERNELS"
CHOICES = ("auto", "torch", "numba")


def kernel_choice() -> str:
    """The value of ``SELFAUGMENT_AUGMENT_KERNELS`` (``auto`` when unset or empty)."""
    value = os.environ.get(KERNELS_VARIABLE, "").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(
            f"{KERNELS_VARIABLE}={os.environ[KERNELS_VARIABLE]!r}: expected one of "
            f"{', '.join(CHOICES)} (auto: numba when it imports, else torch)"
        )
    return value


def cache_folder() -> Path:
    """Where numba keeps compiled kernels: ``NUMBA_CACHE_DIR``, else ``$SELFAUGMENT_CACHE/numba``
    (``~/.cache/selfaugment/numba``)."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return Path(configured)
    from selfaugment.trainer.store.s3 import cache_root

    return cache_root() / "numba"


@functools.cache
def _kernels() -> ModuleType | None:
    """``augment/kernels.py``, imported once with the cache folder set; None without numba."""
    try:
        import numba
    except ImportError:
        return None
    if not os.environ.get("NUMBA_CACHE_DIR"):
        # Read when each kernel is decorated (the import below), not when numba is imported.
        numba.config.CACHE_DIR = str(cache_folder())  # type: ignore[attr-defined]
    from selfaugment.trainer.augment import kernels

    return kernels


def _require_kernels() -> ModuleType:
    kernels = _kernels()
    if kernels is None:
        raise RuntimeError("the compiled augmentation path needs numba, which cannot be imported")
    return kernels


def use_compiled(images: Tensor) -> bool:
    """True when ``images`` take the compiled path: a CPU uint8 batch, numba importable and
    this torch's crop arithmetic reproduced (``crop_arithmetic``); with
    ``SELFAUGMENT_AUGMENT_KERNELS=numba`` a missing requirement is an error."""
    choice = kernel_choice()
    if choice == "torch" or images.dtype != torch.uint8 or images.device.type != "cpu":
        return False
    if _kernels() is None:
        if choice == "numba":
            raise RuntimeError(f"{KERNELS_VARIABLE}=numba, but numba cannot be imported")
        return False
    if crop_arithmetic() is None:
        if choice == "numba":
            raise RuntimeError(
                f"{KERNELS_VARIABLE}=numba, but the compiled crop does not reproduce this "
                "torch's grid_sample (crop_arithmetic)"
            )
        return False
    return True


def _probe_crop(fused: bool) -> tuple[Tensor, Tensor]:
    """The eager crop and the compiled one (with or without fused multiply-adds) of a small
    fixed batch: odd sizes and values / 255, so that products and sums are inexact and the two
    ways of rounding them differ (on this probe they differ in about a quarter of the values)."""
    kernels = _require_kernels()
    generator = torch.Generator().manual_seed(0)
    batch, channels, height, width = 6, 3, 13, 19
    images = torch.randint(0, 256, (batch, channels, height, width), generator=generator)
    images = images.to(torch.uint8)
    boxes, flips = crop_flip_draws(batch, height, width, generator, crop=True, flip=True)
    eager = resized_crop_flip(
        images.float().div_(MAX_LEVEL), torch.from_numpy(boxes), torch.from_numpy(flips)
    )
    grid_x, grid_y = sampling_grid(boxes, flips, height, width)
    compiled = torch.empty_like(eager)
    _, as_units = _level_tables()
    none = np.zeros((batch, 0), np.int64)
    kernels.augment(
        images.numpy(), as_units, False, True, grid_x, grid_y, fused, True, none,
        none.astype(np.float64), none.astype(np.float32), np.zeros((batch, 0, 6)),
        np.zeros((batch, 0, 2)), as_units, compiled.numpy(),
    )  # fmt: skip
    return eager, compiled


@functools.cache
def crop_arithmetic() -> bool | None:
    """Whether this torch's CPU ``grid_sample`` fuses products and sums (True), rounds each
    (False), or neither reproduces it (None: the compiled path stays off).

    Measured, not assumed: the rounding depends on how torch's kernel was compiled for the
    CPU's instruction set (``ATEN_CPU_CAPABILITY``: AVX2 and AVX-512 fuse, the plain build
    does not), and exact equality with the eager path is this module's promise."""
    for fused in (True, False):
        eager, compiled = _probe_crop(fused)
        if torch.equal(eager, compiled):
            return fused
    logger.warning(
        "compiled augmentation off: neither rounding reproduces this torch's grid_sample "
        "(CPU capability %s); the eager path runs",
        torch.backends.cpu.get_cpu_capability(),
    )
    return None


@functools.cache
def _codes() -> np.ndarray:
    """Kernel code per op id, with one more entry (SKIP) for the id -1."""
    kernels = _require_kernels()
    by_name = {
        "AutoContrast": kernels.AUTO_CONTRAST,
        "Equalize": kernels.EQUALIZE,
        "Invert": kernels.INVERT,
        "Solarize": kernels.SOLARIZE,
        "Posterize": kernels.POSTERIZE,
        "Contrast": kernels.CONTRAST,
        "Color": kernels.COLOR,
        "Brightness": kernels.BRIGHTNESS,
        "Sharpness": kernels.SHARPNESS,
        "Cutout": kernels.CUTOUT,
    }
    codes = [kernels.AFFINE if OPS[name].affine is not None else by_name[name] for name in OP_NAMES]
    return np.array([*codes, kernels.SKIP], dtype=np.int64)


_IS_AFFINE = np.array([OPS[name].affine is not None for name in OP_NAMES] + [False])


@functools.cache
def _level_tables() -> tuple[np.ndarray, np.ndarray]:
    """float32 [256]: each level as a float, and divided by 255 by the torch op the eager path
    uses (``div_``), so that the table holds the eager path's values."""
    levels = torch.arange(256, dtype=torch.float32)
    return levels.numpy().copy(), levels.clone().div_(MAX_LEVEL).numpy()


_AFFINE_MEMO: dict[tuple[int, float, int, int], np.ndarray] = {}
_AFFINE_MEMO_ENTRIES = 4096


def _affine_data(op_ids: np.ndarray, arguments: np.ndarray, height: int, width: int) -> np.ndarray:
    """``OpSpec.affine`` of each geometric op id [N] and argument [N] -> [N, 6], memoised per
    (op, argument): the builders map each argument on its own, and a policy with fixed
    magnitudes has two values per op (the two signs), where a builder call costs 50-100 us of
    numpy overhead. One ``np.unique`` over (op, argument) pairs for all ops at once."""
    pairs, inverse = np.unique(arguments + 1j * op_ids, return_inverse=True)
    keys = [(int(pair.imag), pair.real, height, width) for pair in pairs.tolist()]
    # Read into a local dict: safe if another thread clears the memo meanwhile.
    found = {key: row for key in keys if (row := _AFFINE_MEMO.get(key)) is not None}
    missing = [key for key in keys if key not in found]
    computed: dict[tuple[int, float, int, int], np.ndarray] = {}
    for op_id in sorted({key[0] for key in missing}):
        builder = OPS[OP_NAMES[op_id]].affine
        if builder is None:
            raise ValueError(f"_affine_data: {OP_NAMES[op_id]} is not a geometric op")
        values = [key for key in missing if key[0] == op_id]
        rows = builder(np.array([key[1] for key in values]), height, width)
        computed.update(zip(values, rows, strict=True))
    if computed:
        if len(_AFFINE_MEMO) + len(computed) > _AFFINE_MEMO_ENTRIES:
            _AFFINE_MEMO.clear()
        _AFFINE_MEMO.update(computed)
        found.update(computed)
    return np.stack([found[key] for key in keys])[inverse.reshape(-1)]


def _policy_arrays(
    op_ids: np.ndarray, arguments: np.ndarray, height: int, width: int
) -> tuple[np.ndarray, ...]:
    """Kernel codes, float32 factors and affine data of a plan's op ids [B, K] and arguments
    [B, K] (float64), computed as the eager path computes them (the kernel finds Cutout's box
    itself, with ``cutout_boxes``' arithmetic)."""
    codes = _codes()[op_ids]
    factors = arguments.astype(np.float32)  # levels.column: float64 -> float32, to nearest
    affine = np.zeros((*op_ids.shape, 6))  # read only where an op is geometric
    geometric = _IS_AFFINE[op_ids]  # ids of -1 read the last entry: False
    if geometric.any():
        affine[geometric] = _affine_data(op_ids[geometric], arguments[geometric], height, width)
    return codes, factors, affine


def augment(
    images: Tensor,
    crop_flip: tuple[np.ndarray, np.ndarray] | None,
    plan: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    policy_first: bool,
) -> Tensor:
    """The compiled path of ``BatchAugmenter`` on a CPU uint8 batch: float32 [0, 1] views.

    ``crop_flip``: the crop's sampling grid (``crop.sampling_grid``), None without crop and
    flip. ``plan``: op ids, arguments and Cutout centres [B, K, 2] (fractions), None without
    a policy (the views are then not rounded, as in the eager path). All drawn by the caller
    in the eager path's order.
    """
    kernels = _require_kernels()
    batch, channels, height, width = images.shape
    source = np.ascontiguousarray(images.numpy())
    as_levels, as_units = _level_tables()
    if plan is None:
        op_ids, arguments, centers = (
            np.zeros((batch, 0), np.int64), np.zeros((batch, 0)), np.zeros((batch, 0, 2))
        )  # fmt: skip
        values = as_units  # eager: the batch / 255, then the crop
        policy_first = True
    else:
        op_ids, arguments, centers = plan
        values = as_levels
    codes, factors, affine = _policy_arrays(op_ids, arguments, height, width)
    if crop_flip is None:
        grid_x, grid_y = np.zeros((batch, width), np.float32), np.zeros((batch, height), np.float32)
    else:
        grid_x, grid_y = (np.ascontiguousarray(grid, dtype=np.float32) for grid in crop_flip)
    out = torch.empty((batch, channels, height, width), dtype=torch.float32)
    kernels.augment(
        source, values, plan is not None, crop_flip is not None, grid_x, grid_y,
        bool(crop_arithmetic()), policy_first,
        np.ascontiguousarray(codes), np.ascontiguousarray(arguments, dtype=np.float64),
        factors, affine, np.ascontiguousarray(centers, dtype=np.float64), as_units, out.numpy(),
    )  # fmt: skip
    if plan is not None and policy_first and crop_flip is not None:
        out.div_(MAX_LEVEL)  # the eager path divides the crop's float levels
    return out
