"""Datasets: every supported source read into decoded uint8 tensors, and the index splits;
prepared datasets (shards in an artifact store) read in memory or streamed per rank."""

from selfaugment.trainer.data.datasets import infer_format, load_dataset
from selfaugment.trainer.data.memory import (
    DEFAULT_MEMORY_BUDGET,
    decoded_bytes,
    load_prepared,
    open_images,
    resident,
    select_samples,
)
from selfaugment.trainer.data.order import epoch_permutation, step_batches, windowed_order
from selfaugment.trainer.data.prepare import PrepareSettings, prepare_dataset
from selfaugment.trainer.data.prepared import PreparedDataset, open_prepared, open_prepared_uri
from selfaugment.trainer.data.splits import SINGLE_FOLD_HOLDOUT, holdout_split, kfold_splits
from selfaugment.trainer.data.stream import StreamedImages
from selfaugment.trainer.data.types import (
    CorruptImageError,
    DatasetError,
    Images,
    ImageSet,
    LoadReport,
)

__all__ = [
    "DEFAULT_MEMORY_BUDGET",
    "SINGLE_FOLD_HOLDOUT",
    "CorruptImageError",
    "DatasetError",
    "ImageSet",
    "Images",
    "LoadReport",
    "PrepareSettings",
    "PreparedDataset",
    "StreamedImages",
    "decoded_bytes",
    "epoch_permutation",
    "holdout_split",
    "infer_format",
    "kfold_splits",
    "load_dataset",
    "load_prepared",
    "open_images",
    "open_prepared",
    "open_prepared_uri",
    "prepare_dataset",
    "resident",
    "select_samples",
    "step_batches",
    "windowed_order",
]
