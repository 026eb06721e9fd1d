"""Batched policy application: draw a per-sample plan, then run each op once per batch.

A plan says, for each sample and each position of its sub-policy, which op to apply (or
none), with which magnitude and sign. The random numbers come from one ``torch.rand``
draw on the generator's device (so a seeded generator gives the same plan on any
device); the bookkeeping is done in numpy on the CPU, where tiny arrays are cheap.
At each position the samples are grouped: all geometric ops run as one resampling, all
Brightness/Color/Contrast as one blend, every other op once on its own samples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from torch import Tensor

from selfaugment.trainer.augment.geometric import affine_nearest
from selfaugment.trainer.augment.ops import OP_NAMES, OPS, AffineBuilder
from selfaugment.trainer.augment.tensor import blend_with_gray
from selfaugment.trainer.policy.model import AnyPolicy, Policy, RandAugment

_SPECS = [OPS[name] for name in OP_NAMES]
_AFFINE_IDS = np.array([i for i, spec in enumerate(_SPECS) if spec.affine is not None])
_BLEND_IDS = np.array([i for i, spec in enumerate(_SPECS) if spec.blend is not None])
_FULL_BATCH_FRACTION = 0.5


@dataclass(frozen=True)
class AugmentPlan:
    """Per-sample plan (numpy, CPU): op ids [B, K] (index in OP_NAMES, -1 = skip),
    magnitudes [B, K], signs (+-1) [B, K], chosen sub-policy [B] (None for RandAugment)."""

    op_ids: np.ndarray
    magnitudes: np.ndarray
    signs: np.ndarray
    sub_policy: np.ndarray | None = None


def policy_tables(policy: Policy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[S, K] op ids (-1 padding), probabilities, magnitudes (NaN = random)."""
    length = max(len(sub_policy) for sub_policy in policy.sub_policies)
    shape = (len(policy.sub_policies), length)
    op_ids = np.full(shape, -1, dtype=np.int64)
    probabilities = np.zeros(shape)
    magnitudes = np.full(shape, np.nan)
    for row, sub_policy in enumerate(policy.sub_policies):
        for column, setting in enumerate(sub_policy):
            op_ids[row, column] = OP_NAMES.index(setting.op)
            probabilities[row, column] = setting.probability
            if setting.magnitude is not None:
                magnitudes[row, column] = setting.magnitude
    return op_ids, probabilities, magnitudes


def _uniform(shape: tuple[int, int], generator: torch.Generator | None) -> np.ndarray:
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=device).cpu().double().numpy()


def _choose(uniform: np.ndarray, count: int) -> np.ndarray:
    """Uniform integers in [0, count) from uniform floats in [0, 1)."""
    return np.minimum((uniform * count).astype(np.int64), count - 1)


def sample_plan(
    policy: AnyPolicy, batch: int, generator: torch.Generator | None = None
) -> AugmentPlan:
    """Draw the per-sample sub-policy, Bernoulli(p) outcomes, magnitudes and signs."""
    if isinstance(policy, RandAugment):
        draws = _uniform((batch, 2 * policy.num_ops), generator)
        op_ids = _choose(draws[:, : policy.num_ops], len(OP_NAMES))
        signs = np.where(draws[:, policy.num_ops :] < 0.5, -1.0, 1.0)
        return AugmentPlan(op_ids, np.full(op_ids.shape, policy.magnitude), signs)
    table_ids, table_p, table_m = policy_tables(policy)
    length = table_ids.shape[1]
    draws = _uniform((batch, 1 + 3 * length), generator)
    choice = _choose(draws[:, 0], len(policy.sub_policies))
    applied = draws[:, 1 : 1 + length] < table_p[choice]
    chosen_m = table_m[choice]
    magnitudes = np.where(np.isnan(chosen_m), draws[:, 1 + length : 1 + 2 * length], chosen_m)
    signs = np.where(draws[:, 1 + 2 * length :] < 0.5, -1.0, 1.0)
    op_ids = np.where(applied, table_ids[choice], -1)
    return AugmentPlan(op_ids, magnitudes, signs, choice)


def _on_rows(
    images: Tensor, rows: np.ndarray, function: Callable[..., Tensor], *arguments: object
) -> Tensor:
    """``function(samples, *arguments)`` on the samples ``rows`` (in place when a subset)."""
    if rows.size == images.shape[0]:
        return function(images, *arguments)
    index = torch.from_numpy(rows).to(images.device)
    images.index_copy_(0, index, function(images.index_select(0, index), *arguments))
    return images


def _arguments(ids: np.ndarray, magnitudes: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """Each sample's op argument (float64), from its op's record."""
    arguments = np.zeros(ids.shape)
    for op_id in np.unique(ids):
        rows = ids == op_id
        arguments[rows] = _SPECS[op_id].argument(magnitudes[rows], signs[rows])
    return arguments


def _tensor(values: np.ndarray, device: torch.device) -> Tensor:
    return torch.from_numpy(values.astype(np.float32)).to(device)


def _resample(images: Tensor, ids: np.ndarray, arguments: np.ndarray) -> Tensor:
    """All geometric ops of one position in one ``affine_nearest`` call (ids of other
    ops get the identity map)."""
    height, width = images.shape[2], images.shape[3]
    matrices = torch.eye(2, 3).repeat(ids.size, 1, 1)
    for op_id in np.unique(ids[np.isin(ids, _AFFINE_IDS)]):
        rows = torch.from_numpy(ids == op_id)
        builder = cast(AffineBuilder, _SPECS[op_id].affine)  # set for all _AFFINE_IDS
        matrices[rows] = builder(_tensor(arguments[rows.numpy()], matrices.device), height, width)
    return affine_nearest(images, matrices)


def _fused_rows(selected: np.ndarray) -> np.ndarray:
    """Rows to run a fused group on: all of them when most samples take part (the others
    get identity arguments), which saves the gather and scatter of a subset."""
    if selected.mean() >= _FULL_BATCH_FRACTION:
        return np.arange(selected.size)
    return np.flatnonzero(selected)


def apply_plan(images: Tensor, plan: AugmentPlan, generator: torch.Generator | None) -> Tensor:
    """Apply ``plan`` to a float batch (modified in place); returns the result."""
    device = images.device
    for position in range(plan.op_ids.shape[1]):
        ids = plan.op_ids[:, position]
        arguments = _arguments(ids, plan.magnitudes[:, position], plan.signs[:, position])
        geometric = np.isin(ids, _AFFINE_IDS)
        if geometric.any():
            rows = _fused_rows(geometric)
            images = _on_rows(images, rows, _resample, ids[rows], arguments[rows])
        blended = np.isin(ids, _BLEND_IDS)
        if blended.any():
            rows = _fused_rows(blended)
            factors = np.where(blended, arguments, 1.0)[rows]  # factor 1 = identity
            weights = np.array(
                [_SPECS[i].blend if i in _BLEND_IDS else (0.0, 0.0) for i in ids[rows]]
            )
            images = _on_rows(
                images,
                rows,
                blend_with_gray,
                *(_tensor(values, device) for values in (factors, weights[:, 0], weights[:, 1])),
            )
        for op_id in np.unique(ids[(ids >= 0) & ~geometric & ~blended]):
            rows = np.flatnonzero(ids == op_id)
            op_arguments = _tensor(arguments[rows], device)
            images = _on_rows(images, rows, _SPECS[op_id].tensor, op_arguments, generator)
    return images
