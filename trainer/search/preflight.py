"""Checks a search's inputs once, before any task starts, so bad input fails in one line
naming the field instead of inside every worker, retried (`selfaugment search` runs these).

What the spec model cannot know alone is checked here against the dataset: that it can be read,
and that every stage's training set holds at least one batch.
"""

from __future__ import annotations

from selfaugment.trainer.config import ConfigError
from selfaugment.trainer.data import kfold_splits, load_dataset
from selfaugment.trainer.search.planner import reads_prepared
from selfaugment.trainer.spec import AugmentSearchSpec


def _count(spec: AugmentSearchSpec) -> int:
    """The dataset's size: a built-in source loaded; any other counted from a listing of its
    items (nothing decoded: the `prepare` task reads them; unreadable ones are left out there,
    so a count that only just passes here may still fail in a task)."""
    dataset = spec.dataset
    if not reads_prepared(dataset):
        return len(load_dataset(dataset, seed=spec.search.seed))
    from selfaugment.trainer.data.sources import open_source

    count = len(open_source(dataset))
    return count if dataset.limit is None else min(dataset.limit, count)


def preflight(spec: AugmentSearchSpec) -> int:
    """Raise ConfigError or DatasetError on input no task could run with; returns the count."""
    count = _count(spec)
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
