"""Data containers and errors shared by the dataset readers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from selfaugment.errors import SelfAugmentError


class DatasetError(SelfAugmentError, ValueError):
    """A dataset cannot be read; the message names the uri, file or config field at fault."""


class CorruptImageError(DatasetError):
    """An image file cannot be decoded and `dataset.on_corrupt` is 'fail'."""

    def __init__(self, file: str, reason: str) -> None:
        self.file = file
        self.reason = reason
        super().__init__(
            f"corrupt or unreadable image {file}: {reason} "
            "(set dataset.on_corrupt: skip to leave such files out and report them)"
        )


@dataclass
class LoadReport:
    """What `load_dataset` read: where from, how many images, which files it skipped and why."""

    source: str
    format: str
    split: str
    num_images: int
    image_size: int
    channels: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def num_skipped(self) -> int:
        """Number of unreadable files left out."""
        return len(self.skipped)

    def summary(self) -> str:
        """One line for logs and reports."""
        text = (
            f"{self.source} ({self.format}, split {self.split}): {self.num_images} images "
            f"{self.channels}x{self.image_size}x{self.image_size} in {self.seconds:.1f}s"
        )
        if self.skipped:
            text += f", {self.num_skipped} unreadable file(s) skipped"
        return text


@dataclass
class ImageSet:
    """Decoded images in memory: uint8 [N, C, H, W] with optional int64 labels [N]."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int | None
    names: list[str] | None
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)
    report: LoadReport | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(
                f"{self.source}: images must be uint8 [N, C, H, W], "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        count = self.images.shape[0]
        if self.labels is not None and tuple(self.labels.shape) != (count,):
            raise DatasetError(
                f"{self.source}: {count} images but labels of shape {tuple(self.labels.shape)}"
            )
        if self.names is not None and len(self.names) != count:
            raise DatasetError(f"{self.source}: {count} images but {len(self.names)} names")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def has_labels(self) -> bool:
        """True when every image has a class label."""
        return self.labels is not None

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> ImageSet:
        """The images at `indices` (in that order, or a boolean mask); labels and names follow."""
        array = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if array.dtype == np.bool_:
            if array.shape != (len(self),):
                raise DatasetError(f"{self.source}: boolean mask must have {len(self)} entries")
            array = np.flatnonzero(array)
        index = torch.as_tensor(array.astype(np.int64))
        if index.dim() != 1:
            raise DatasetError(f"{self.source}: subset indices must be 1-D")
        if len(index) and (int(index.min()) < -len(self) or int(index.max()) >= len(self)):
            raise DatasetError(f"{self.source}: subset index out of range for {len(self)} images")
        names = [self.names[int(i)] for i in index] if self.names is not None else None
        return ImageSet(
            images=self.images[index],
            labels=self.labels[index] if self.labels is not None else None,
            num_classes=self.num_classes,
            names=names,
            source=self.source,
            skipped=list(self.skipped),
            report=self.report,
        )


@dataclass
class ArrayData:
    """Undecoded-size pixels from an array source (IDX, npz, CIFAR...) before limit and resize."""

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int | None
    name_prefix: str

    def __post_init__(self) -> None:
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DatasetError(
                f"{self.name_prefix}: {len(self.images)} images but {len(self.labels)} labels"
            )


def check_labels(labels: np.ndarray, source: str) -> np.ndarray:
    """Labels as int64 [N], non-negative integers; the error names `source`."""
    labels = np.asarray(labels)
    if labels.ndim == 2 and 1 in labels.shape:
        labels = labels.reshape(-1)
    if labels.ndim != 1:
        raise DatasetError(f"{source}: labels must be 1-D, got shape {tuple(labels.shape)}")
    whole = np.issubdtype(labels.dtype, np.integer) or np.all(np.equal(np.mod(labels, 1), 0))
    if labels.size and not whole:
        raise DatasetError(f"{source}: labels must be whole numbers, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.size and int(labels.min()) < 0:
        raise DatasetError(f"{source}: labels must be >= 0, found {int(labels.min())}")
    return labels


class Images(Protocol):
    """What training and the probes need of an image set (ImageSet has it)."""

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int | None
    source: str

    def __len__(self) -> int: ...

    def subset(self, indices: Any) -> Any: ...
