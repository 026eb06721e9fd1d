"""Datasets: every supported source read into decoded uint8 tensors, and the index splits."""

from selfaugment.trainer.data.datasets import infer_format, load_dataset
from selfaugment.trainer.data.splits import SINGLE_FOLD_HOLDOUT, holdout_split, kfold_splits
from selfaugment.trainer.data.types import CorruptImageError, DatasetError, ImageSet, LoadReport

__all__ = [
    "SINGLE_FOLD_HOLDOUT",
    "CorruptImageError",
    "DatasetError",
    "ImageSet",
    "LoadReport",
    "holdout_split",
    "infer_format",
    "kfold_splits",
    "load_dataset",
]
