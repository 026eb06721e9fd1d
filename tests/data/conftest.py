"""Small real image folders and prepared datasets for the prepared-data tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data import PreparedDataset, prepare_dataset
from selfaugment.trainer.store import LocalStore

# Shorter sides of the folder's images: some at most the storage size (kept as they are),
# some larger (downscaled and re-encoded).
SIDES = (20, 28, 40, 64)
STORAGE_SIZE = 32
CORRUPT_NAME = "dog/broken.jpg"


def write_image(path: Path, rng: np.random.Generator, side: int, gray: bool = False) -> None:
    """A smooth random image (JPEG artefacts stay realistic), `side` x `side + 6`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = rng.integers(0, 256, (4, 4) if gray else (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((side + 6, side), Image.Resampling.BILINEAR)
    image.save(path)


def make_folder(root: Path, per_class: int = 6, corrupt: bool = True, seed: int = 0) -> Path:
    """cat/ and dog/ with `per_class` images each (JPEG and PNG, RGB and gray, mixed sizes),
    plus one file that is not an image when `corrupt`."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("cat", "dog")):
        for index in range(per_class):
            suffix = ".png" if index % 3 == 1 else ".jpg"
            side = SIDES[(index + label) % len(SIDES)]
            write_image(root / name / f"{index:03d}{suffix}", rng, side, gray=index % 4 == 3)
    if corrupt:
        (root / CORRUPT_NAME).write_bytes(b"\xff\xd8 this is not a JPEG")
    return root


def folder_config(root: Path, **fields: object) -> DatasetConfig:
    return DatasetConfig.model_validate({"uri": str(root), **fields})


@pytest.fixture()
def make_image_folder() -> Callable[..., Path]:
    """make_folder, for tests that need a folder of their own."""
    return make_folder


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """cat/ and dog/, 6 images each, and one corrupt file (dog/broken.jpg)."""
    return make_folder(tmp_path / "images")


@pytest.fixture()
def prepared(tmp_path: Path, image_folder: Path) -> PreparedDataset:
    """The image folder (12 readable images, 1 corrupt) prepared locally at storage size 32,
    4 items per shard (4 shards)."""
    store = LocalStore(tmp_path / "store")
    return prepare_dataset(folder_config(image_folder), store, STORAGE_SIZE, shard_size=4)
