"""Checks a search's inputs once, before any task starts, so bad input fails in one line
naming the field instead of inside every worker, retried (`selfaugment search` runs these).

What the spec model cannot know alone is checked here against the dataset: that it can be read,
and that every stage's training set holds at least one batch.
"""

from __future__ import annotations

from selfaugment.trainer.config import ConfigError
from selfaugment.trainer.data import kfold_splits, load_dataset
from selfaugment.trainer.spec import AugmentSearchSpec


def preflight(spec: AugmentSearchSpec) -> int:
    """Raise ConfigError or DatasetError on input no task could run with; returns the count."""
    images = load_dataset(spec.dataset, seed=spec.search.seed)
    count = len(images)
    folds = spec.search.folds if spec.search.algorithm == "selfaugment" else 1
    smallest_train = min(len(train) for train, _ in kfold_splits(count, folds, spec.search.seed))
    batch = spec.optim.batch_size
    if batch > smallest_train:
        raise ConfigError(
            f"optim.batch_size={batch} is larger than a fold's training part ({smallest_train} "
            f"of {count} images with search.folds={folds}): lower optim.batch_size or use "
            "fewer folds"
        )
    retrain_batch = spec.retrain.batch_size or batch
    if retrain_batch > count:
        raise ConfigError(
            f"retrain.batch_size={retrain_batch} is larger than the dataset ({count} images)"
        )
    return count
