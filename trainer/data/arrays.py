"""Array sources: NumPy .npz files and scikit-learn's bundled digits."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from selfaugment.trainer.data.types import ArrayData, DatasetError, check_labels

# load_digits: 1797 images of 8x8 pixels with 17 gray levels, 0..16 (scikit-learn docs).
DIGITS_MAX_LEVEL = 16
DIGITS_CLASSES = 10


def load_npz(path: Path) -> ArrayData:
    """Key 'images' ([N,H,W], [N,H,W,C] or [N,C,H,W]; uint8 or float in [0, 1]), 'labels' optional."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            if "images" not in keys:
                raise DatasetError(
                    f"{path}: no 'images' array in the .npz file (keys present: "
                    f"{', '.join(keys) or 'none'}); save images under the key 'images'"
                )
            images = archive["images"]
            labels = archive["labels"] if "labels" in keys else None
    except (OSError, zipfile.BadZipFile, EOFError) as error:
        raise DatasetError(f"{path}: not a readable .npz file: {error}") from None
    except ValueError as error:  # object arrays need pickle, which we refuse
        raise DatasetError(f"{path}: unsupported array in .npz file: {error}") from None
    num_classes = None
    if labels is not None:
        labels = check_labels(labels, f"{path}: 'labels'")
        if len(labels) != len(images):
            raise DatasetError(f"{path}: {len(images)} images but {len(labels)} labels")
        num_classes = int(labels.max()) + 1 if len(labels) else None
    return ArrayData(images, labels, num_classes, path.name)


def load_digits_data(split: str) -> ArrayData:
    """scikit-learn's digits as uint8 images scaled from 0..16 to 0..255; labels 0..9."""
    if split != "train":
        raise DatasetError(
            "dataset.split: sklearn:digits has a single split, use 'train' "
            "(evaluations hold out part of it via probe.holdout_fraction)"
        )
    from sklearn.datasets import load_digits

    bunch = load_digits()
    levels = np.asarray(bunch.images, dtype=np.float64)
    images = np.rint(levels * (255.0 / DIGITS_MAX_LEVEL)).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    return ArrayData(images, labels, DIGITS_CLASSES, "digits")
