"""Batched policy application: draw a per-sample plan, then run each op once per batch.

A plan says, for each sample and each position of its sub-policy, which op to apply (or
none), with which magnitude and sign, and where Cutout's square goes. All randomness is in
the plan, drawn with one ``torch.rand`` call on the generator's device (so a seeded generator
gives the same plan on any device), and applying a plan is deterministic: the PIL reference
can replay the same plan (``augmenter.apply_plan_pil``), which is how the batched path that
trains is verified. The bookkeeping is numpy on the CPU, where tiny arrays are cheap.

The batch is held as float32 8-bit levels (``augment/levels.py``) from the first op to the
last, so every op rounds as PIL does and a chain of ops equals PIL's chain. At each position
the samples are grouped: all geometric ops run as one resampling, all Brightness/Color/
Contrast as one blend, every other op once on its own samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

from selfaugment.trainer.augment import levels as exact
from selfaugment.trainer.augment.geometric import (
    IDENTITY,
    AffineBuilder,
    affine_nearest,
    cutout_boxes,
    fill_boxes_,
)
from selfaugment.trainer.augment.ops import OP_NAMES, OPS
from selfaugment.trainer.augment.pil import GRAY_FILL
from selfaugment.trainer.augment.tensor import LevelOp
from selfaugment.trainer.policy.model import AnyPolicy, Policy, RandAugment

_SPECS = [OPS[name] for name in OP_NAMES]
# Per op id (and one more entry, for -1 = skip, so that tables can be indexed with ids):
_IS_AFFINE = np.array([spec.affine is not None for spec in _SPECS] + [False])
_IS_BLEND = np.array([spec.blend is not None for spec in _SPECS] + [False])
_IDENTITY_ARGUMENT = np.array([spec.identity_argument for spec in _SPECS] + [0.0])
_SPAN = np.array([spec.max_argument - spec.identity_argument for spec in _SPECS] + [0.0])
_SIGNED = np.array([spec.signed for spec in _SPECS] + [False])
_BLEND_WEIGHTS = np.array([spec.blend or (0.0, 0.0) for spec in _SPECS] + [(0.0, 0.0)])
"""[ops + 1, 2]: each op's (gray, mean) weights in ``blend_with_gray`` ((0, 0) for the rest)."""
_CUTOUT_ID = OP_NAMES.index("Cutout")
_FULL_BATCH_FRACTION = 0.5


@dataclass(frozen=True)
class AugmentPlan:
    """Per-sample plan (numpy, CPU): op ids [B, K] (index in OP_NAMES, -1 = skip),
    magnitudes [B, K], signs (+-1) [B, K], chosen sub-policy [B] (None for RandAugment),
    and Cutout centres [B, K, 2] as fractions of the width and height in [0, 1) (None: drawn
    from the generator when the plan is applied)."""

    op_ids: np.ndarray
    magnitudes: np.ndarray
    signs: np.ndarray
    sub_policy: np.ndarray | None = None
    centers: np.ndarray | None = None


PolicyTables = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def policy_tables(policy: Policy) -> PolicyTables:
    """[S, K] op ids (-1 padding), probabilities, magnitudes (NaN = random), directions
    (0 = random)."""
    length = max(len(sub_policy) for sub_policy in policy.sub_policies)
    shape = (len(policy.sub_policies), length)
    op_ids = np.full(shape, -1, dtype=np.int64)
    probabilities = np.zeros(shape)
    magnitudes = np.full(shape, np.nan)
    directions = np.zeros(shape)
    for row, sub_policy in enumerate(policy.sub_policies):
        for column, setting in enumerate(sub_policy):
            op_ids[row, column] = OP_NAMES.index(setting.op)
            probabilities[row, column] = setting.probability
            if setting.magnitude is not None:
                magnitudes[row, column] = setting.magnitude
            if setting.direction is not None:
                directions[row, column] = setting.direction
    return op_ids, probabilities, magnitudes, directions


def _uniform(shape: tuple[int, int], generator: torch.Generator | None) -> np.ndarray:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device).cpu().double().numpy()


def _choose(uniform: np.ndarray, count: int) -> np.ndarray:
    """Uniform integers in [0, count) from uniform floats in [0, 1)."""
    return np.minimum((uniform * count).astype(np.int64), count - 1)


def _signs(uniform: np.ndarray) -> np.ndarray:
    return np.where(uniform < 0.5, -1.0, 1.0)


def sample_plan(
    policy: AnyPolicy,
    batch: int,
    generator: torch.Generator | None = None,
    tables: PolicyTables | None = None,
) -> AugmentPlan:
    """Draw the per-sample sub-policy, Bernoulli(p) outcomes, magnitudes, signs (where the
    policy does not fix the direction) and Cutout centres. ``tables``: ``policy_tables(policy)``
    when the caller keeps them (``BatchAugmenter`` does: they are the same for every batch)."""
    if isinstance(policy, RandAugment):
        count = policy.num_ops
        draws = _uniform((batch, 4 * count), generator)
        op_ids = _choose(draws[:, :count], len(OP_NAMES))
        centers = draws[:, 2 * count :].reshape(batch, count, 2)
        magnitudes = np.full(op_ids.shape, policy.magnitude)
        return AugmentPlan(op_ids, magnitudes, _signs(draws[:, count : 2 * count]), None, centers)
    table_ids, table_p, table_m, table_d = tables if tables is not None else policy_tables(policy)
    length = table_ids.shape[1]
    draws = _uniform((batch, 1 + 5 * length), generator)
    choice = _choose(draws[:, 0], len(policy.sub_policies))
    applied = draws[:, 1 : 1 + length] < table_p[choice]
    chosen_m, chosen_d = table_m[choice], table_d[choice]
    magnitudes = np.where(np.isnan(chosen_m), draws[:, 1 + length : 1 + 2 * length], chosen_m)
    signs = np.where(chosen_d != 0, chosen_d, _signs(draws[:, 1 + 2 * length : 1 + 3 * length]))
    centers = draws[:, 1 + 3 * length :].reshape(batch, length, 2)
    op_ids = np.where(applied, table_ids[choice], -1)
    return AugmentPlan(op_ids, magnitudes, signs, choice, centers)


def _on_rows(
    images: Tensor, rows: np.ndarray, function: Callable[..., Tensor], *arguments: object
) -> Tensor:
    """``function(samples, *arguments)`` on the samples ``rows`` (in place when a subset).

    On the CPU the samples are gathered and written back by numpy, which copies whole samples:
    two to three times faster than torch's ``index_select`` and ``index_copy_`` for the groups
    of 20-60 samples of a batch of 256 that most ops get.
    """
    if rows.size == images.shape[0]:
        return function(images, *arguments)
    if images.device.type == "cpu":
        batch = images.numpy()
        result = function(torch.from_numpy(np.take(batch, rows, axis=0)), *arguments)
        batch[rows] = result.numpy()
        return images
    index = torch.from_numpy(rows).to(images.device)
    images.index_copy_(0, index, function(images.index_select(0, index), *arguments))
    return images


def _arguments(ids: np.ndarray, magnitudes: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Each sample's op argument (float64): ``OpSpec.argument`` for all ops at once, with the
    same operations in the same order, so the same values to the last bit."""
    span = _SPAN[ids] * magnitudes
    span = span * np.where(_SIGNED[ids], signs, 1.0)  # * 1.0 is exact
    return np.where(ids >= 0, span + _IDENTITY_ARGUMENT[ids], 0.0)  # skipped: 0, as before


def _resample(levels: Tensor, ids: np.ndarray, arguments: np.ndarray) -> Tensor:
    """All geometric ops of one position in one ``affine_nearest`` call (ids of other
    ops get the identity map)."""
    height, width = levels.shape[2], levels.shape[3]
    data = np.tile(np.array(IDENTITY), (ids.size, 1))
    for op_id in np.unique(ids[_IS_AFFINE[ids]]):
        rows = ids == op_id
        builder = cast(AffineBuilder, _SPECS[op_id].affine)  # set for every op of _IS_AFFINE
        data[rows] = builder(arguments[rows], height, width)
    return affine_nearest(levels, data, fill=float(GRAY_FILL))


def _blend(levels: Tensor, ids: np.ndarray, factors: Tensor) -> Tensor:
    """Brightness, Color and Contrast of one position in one blend (other rows: factor 1)."""
    weights = _BLEND_WEIGHTS[ids]
    return exact.blend_with_gray(
        levels, factors, torch.from_numpy(weights[:, 0]), torch.from_numpy(weights[:, 1])
    )


def _cutout(levels: Tensor, fractions: Tensor, centers: Tensor) -> Tensor:
    height, width = levels.shape[2], levels.shape[3]
    pixels = centers * torch.tensor([float(width), float(height)], dtype=torch.float64)
    return fill_boxes_(levels, cutout_boxes(fractions, pixels, height, width), float(GRAY_FILL))


def _fused_rows(selected: np.ndarray) -> np.ndarray:
    """Rows to run a fused group on: all of them when most samples take part (the others
    get identity arguments), which saves the gather and scatter of a subset."""
    if np.count_nonzero(selected) >= _FULL_BATCH_FRACTION * selected.size:
        return np.arange(selected.size)
    return np.flatnonzero(selected)


def _centers(plan: AugmentPlan, generator: torch.Generator | None) -> np.ndarray:
    if plan.centers is not None:
        return plan.centers
    # a plan built by hand: Cutout centres from the generator
    centers = _uniform((plan.op_ids.shape[0], 2 * plan.op_ids.shape[1]), generator)
    return centers.reshape(*plan.op_ids.shape, 2)


def plan_arguments(
    plan: AugmentPlan, generator: torch.Generator | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the compiled path (``augment/compiled.py``) needs of ``plan``: op ids [B, K], each
    op's argument [B, K] (float64, the values ``apply_plan_levels`` computes) and Cutout centres
    [B, K, 2] (drawn from ``generator`` as ``apply_plan_levels`` draws them when missing)."""
    centers = _centers(plan, generator)
    return plan.op_ids, _arguments(plan.op_ids, plan.magnitudes, plan.signs), centers


def apply_plan_levels(
    levels: Tensor, plan: AugmentPlan, generator: torch.Generator | None = None
) -> Tensor:
    """Apply ``plan`` to float32 whole levels 0..255 (modified in place); returns levels."""
    centers = _centers(plan, generator)
    for position in range(plan.op_ids.shape[1]):
        ids = plan.op_ids[:, position]
        arguments = _arguments(ids, plan.magnitudes[:, position], plan.signs[:, position])
        geometric = _IS_AFFINE[ids]  # ids of -1 read the last entry: False
        if geometric.any():
            rows = _fused_rows(geometric)
            levels = _on_rows(levels, rows, _resample, ids[rows], arguments[rows])
        blended = _IS_BLEND[ids]
        if blended.any():
            rows = _fused_rows(blended)
            factors = torch.from_numpy(np.where(blended, arguments, 1.0)[rows])  # 1: identity
            levels = _on_rows(levels, rows, _blend, ids[rows], factors)
        for op_id in np.unique(ids[(ids >= 0) & ~geometric & ~blended]):
            rows = np.flatnonzero(ids == op_id)
            values = torch.from_numpy(arguments[rows])
            if op_id == _CUTOUT_ID:
                where = torch.from_numpy(centers[rows, position])
                levels = _on_rows(levels, rows, _cutout, values, where)
            else:
                level_op = cast(LevelOp, _SPECS[op_id].levels)  # set for all colour ops
                levels = _on_rows(levels, rows, level_op, values)
    return levels


def apply_plan(images: Tensor, plan: AugmentPlan, generator: torch.Generator | None) -> Tensor:
    """Apply ``plan`` to a float batch in [0, 1] (modified in place); returns the result, on
    8-bit levels (``k / 255``): the input is rounded to the nearest level first."""
    levels = images if images.dtype == torch.float32 else images.float()
    levels = levels.mul_(exact.MAX_LEVEL).round_().clamp_(0.0, exact.MAX_LEVEL)
    return apply_plan_levels(levels, plan, generator).div_(exact.MAX_LEVEL).to(images.dtype)
