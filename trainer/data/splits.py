"""Deterministic index splits: a hold-out split and the K folds of SelfAugment's search.

Algorithm 1 of SelfAugment (Reed et al. 2021) trains on D_M and scores policies on the held-out
D_A of each of K folds (paper default K = 5, so each D_A is 20% of the data).
"""

from __future__ import annotations

import numpy as np

from selfaugment.trainer.data.types import DatasetError

# With folds=1 there is nothing to rotate: a single split holding out 1/5 of the data, the same
# share as one fold of the paper's K = 5 (and ProbeConfig.holdout_fraction's default).
SINGLE_FOLD_HOLDOUT = 0.2


def holdout_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, heldout_idx), each sorted int64; round(n * fraction) held out, at least 1."""
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"holdout fraction must be in (0, 1), got {fraction}")
    if n < 2:
        raise DatasetError(f"a hold-out split needs at least 2 images, got {n}")
    held = min(max(round(n * fraction), 1), n - 1)
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[held:]).astype(np.int64), np.sort(order[:held]).astype(np.int64)


def kfold_splits(n: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per fold (train part D_M, held-out part D_A), sorted int64 indices.

    The held-out parts partition range(n) into sizes differing by at most one. folds=1 means a
    single hold-out split of SINGLE_FOLD_HOLDOUT (20%).
    """
    if folds < 1:
        raise DatasetError(f"folds must be >= 1, got {folds}")
    if folds == 1:
        return [holdout_split(n, SINGLE_FOLD_HOLDOUT, seed)]
    if n < folds:
        raise DatasetError(f"{folds} folds need at least {folds} images, got {n}")
    order = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(order, folds)
    splits = []
    for fold_index, heldout in enumerate(parts):
        train = np.concatenate([part for i, part in enumerate(parts) if i != fold_index])
        splits.append((np.sort(train).astype(np.int64), np.sort(heldout).astype(np.int64)))
    return splits
