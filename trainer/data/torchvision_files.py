"""CIFAR-10, SVHN and STL-10 read from their published files (torchvision's folder layout).

The files are parsed here rather than through torchvision's dataset classes, which only
add md5 checks and per-item PIL conversion; torchvision is used to download when allowed.
Layouts: CIFAR-10 python batches (https://www.cs.toronto.edu/~kriz/cifar.html), SVHN
cropped-digit .mat files (http://ufldl.stanford.edu/housenumbers/), STL-10 binaries
(https://cs.stanford.edu/~acoates/stl10/).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from selfaugment.trainer.data.types import ArrayData, DatasetError, check_labels

CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR_SIDE = 32
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
STL_FOLDER = "stl10_binary"
STL_SIDE = 96
TEN_CLASSES = 10

# The only globals a CIFAR batch pickle may name: numpy's array reconstruction helpers, and
# _codecs.encode, which protocol-2 pickles written by Python 3 use to rebuild bytes.
_PICKLE_ALLOWED = {
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that builds numpy arrays and plain containers, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _missing(name: str, expected: Path, hint: str) -> DatasetError:
    return DatasetError(
        f"{name} not found: expected {expected}. Set dataset.root to the directory holding "
        f"{hint}, or dataset.download: true to let torchvision download it there"
    )


def _download(name: str, root: Path, fetch: Callable[[], object]) -> None:
    try:
        fetch()
    except Exception as error:  # network or checksum failures surface as many types
        raise DatasetError(f"{name}: download into {root} failed: {error}") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    try:
        with path.open("rb") as handle:
            batch = _ArrayUnpickler(handle, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as error:
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch: {error}") from None
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{path}: CIFAR-10 batch must be a dict with 'data' and 'labels'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * CIFAR_SIDE * CIFAR_SIDE:
        raise DatasetError(f"{path}: 'data' must be [N, 3072] uint8, got {data.shape}")
    labels = list(batch["labels"])
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE), labels


def load_cifar10(root: Path, split: str, download: bool) -> ArrayData:
    """CIFAR-10 from `root` (the folder holding cifar-10-batches-py, or that folder itself)."""
    folder = root if root.name == CIFAR_FOLDER else root / CIFAR_FOLDER
    names = CIFAR_BATCHES[split]
    if not all((folder / name).is_file() for name in names):
        if not download:
            raise _missing("CIFAR-10", folder / names[0], CIFAR_FOLDER)
        from torchvision.datasets import CIFAR10

        _download(
            "CIFAR-10", root, lambda: CIFAR10(str(root), train=split == "train", download=True)
        )
    parts = [_read_cifar_batch(folder / name) for name in names]
    images = np.concatenate([part[0] for part in parts])
    labels = check_labels(np.concatenate([part[1] for part in parts]), str(folder))
    return ArrayData(images, labels, TEN_CLASSES, f"cifar10-{split}")


def load_svhn(root: Path, split: str, download: bool) -> ArrayData:
    """SVHN cropped digits (.mat, X [32, 32, 3, N], y in 1..10 with 10 meaning digit 0)."""
    path = root / SVHN_FILES[split]
    if not path.is_file():
        if not download:
            raise _missing("SVHN", path, SVHN_FILES[split])
        from torchvision.datasets import SVHN

        _download("SVHN", root, lambda: SVHN(str(root), split=split, download=True))
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DatasetError(f"{path}: reading SVHN needs scipy (pip install scipy)") from None
    try:
        mat = loadmat(str(path))
    except (OSError, ValueError, TypeError) as error:
        raise DatasetError(f"{path}: not a readable SVHN .mat file: {error}") from None
    if "X" not in mat or "y" not in mat:
        raise DatasetError(f"{path}: SVHN .mat file must hold 'X' and 'y'")
    images = np.asarray(mat["X"])
    if images.ndim != 4 or images.shape[2] != 3:
        raise DatasetError(f"{path}: 'X' must be [H, W, 3, N], got {images.shape}")
    labels = check_labels(np.asarray(mat["y"]).reshape(-1), f"{path}: 'y'")
    labels[labels == TEN_CLASSES] = 0
    return ArrayData(images.transpose(3, 2, 0, 1), labels, TEN_CLASSES, f"svhn-{split}")


def _read_stl_file(path: Path) -> np.ndarray:
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise DatasetError(f"{path}: cannot read STL-10 file: {error.strerror}") from None


def load_stl10(root: Path, split: str, download: bool) -> ArrayData:
    """STL-10 binaries: X is uint8 [N, 3, 96, 96] stored column-major, y in 1..10."""
    folder = root if root.name == STL_FOLDER else root / STL_FOLDER
    images_path, labels_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    if not (images_path.is_file() and labels_path.is_file()):
        if not download:
            raise _missing("STL-10", images_path, STL_FOLDER)
        from torchvision.datasets import STL10

        _download("STL-10", root, lambda: STL10(str(root), split=split, download=True))
    raw = _read_stl_file(images_path)
    image_bytes = 3 * STL_SIDE * STL_SIDE
    if raw.size % image_bytes:
        raise DatasetError(
            f"{images_path}: size {raw.size} is not a multiple of {image_bytes} bytes per image"
        )
    images = raw.reshape(-1, 3, STL_SIDE, STL_SIDE).transpose(0, 1, 3, 2)
    labels = check_labels(_read_stl_file(labels_path), str(labels_path)) - 1
    if len(labels) != len(images) or (len(labels) and int(labels.min()) < 0):
        raise DatasetError(f"{labels_path}: expected {len(images)} labels in 1..10")
    return ArrayData(images, labels, TEN_CLASSES, f"stl10-{split}")


LOADERS: dict[str, Callable[[Path, str, bool], ArrayData]] = {
    "cifar10": load_cifar10,
    "svhn": load_svhn,
    "stl10": load_stl10,
}
