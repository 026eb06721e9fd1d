"""Tests for selfaugment.trainer.data.datasets: every source, corrupt files, conversions and splits."""

from __future__ import annotations

import gzip
import io
import logging
import pickle
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data import (
    SINGLE_FOLD_HOLDOUT,
    CorruptImageError,
    DatasetError,
    ImageSet,
    holdout_split,
    kfold_splits,
    load_dataset,
)
from selfaugment.trainer.data.convert import convert_channels, resize_and_crop

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def config(uri: str, **fields: object) -> DatasetConfig:
    return DatasetConfig.model_validate({"uri": uri, **fields})


def save_image(path: Path, array: np.ndarray, mode: str | None = None, **options: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    image.save(path, **options)


def solid(height: int, width: int, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, dtype=np.uint8), (height, width, 3)).copy()


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">HBB", 0, type_code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


# ---------------------------------------------------------------- digits, limit, conversions


def test_digits_scaled_to_uint8_with_labels() -> None:
    from sklearn.datasets import load_digits

    image_set = load_dataset(config("sklearn:digits", image_size=8, channels=1))
    reference = load_digits()
    assert image_set.images.shape == (1797, 1, 8, 8)
    assert image_set.images.dtype == torch.uint8
    expected = np.rint(reference.images * 255 / 16).astype(np.uint8)
    assert np.array_equal(image_set.images[:, 0].numpy(), expected)
    assert image_set.labels is not None and image_set.labels.dtype == torch.int64
    assert np.array_equal(image_set.labels.numpy(), reference.target)
    assert image_set.num_classes == 10 and image_set.has_labels
    assert image_set.report is not None and image_set.report.num_images == 1797
    assert image_set.report.format == "digits"


def test_digits_resized_and_repeated_to_rgb() -> None:
    image_set = load_dataset(config("sklearn:digits", image_size=16, channels=3, limit=50))
    assert image_set.images.shape == (50, 3, 16, 16)
    assert torch.equal(image_set.images[:, 0], image_set.images[:, 2])
    assert int(image_set.images.max()) > 200  # strokes survive upscaling


def test_digits_has_no_test_split() -> None:
    with pytest.raises(DatasetError, match=r"dataset\.split"):
        load_dataset(config("sklearn:digits", split="test"))


def test_limit_is_seeded_and_consistent_with_full_set() -> None:
    full = load_dataset(config("sklearn:digits", image_size=8))
    first = load_dataset(config("sklearn:digits", image_size=8, limit=100), seed=3)
    again = load_dataset(config("sklearn:digits", image_size=8, limit=100), seed=3)
    other = load_dataset(config("sklearn:digits", image_size=8, limit=100), seed=4)
    assert len(first) == 100 and first.names == again.names
    assert first.names != other.names
    assert first.names is not None and full.names is not None
    positions = [full.names.index(name) for name in first.names]
    assert positions == sorted(positions)  # kept in source order
    assert torch.equal(first.images, full.images[positions])
    assert first.labels is not None and full.labels is not None
    assert torch.equal(first.labels, full.labels[positions])
    # Not simply the first 100 images.
    assert positions != list(range(100))


def test_convert_channels_luma_and_repeat() -> None:
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=torch.uint8)
    batch = rgb.view(3, 3, 1, 1)  # three 1x1 images: red, green, blue
    luma = convert_channels(batch, 1, "test")
    # ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B.
    assert luma.flatten().tolist() == [76, 150, 29]
    gray = torch.full((2, 1, 4, 4), 9, dtype=torch.uint8)
    assert torch.equal(convert_channels(gray, 3, "test"), torch.full((2, 3, 4, 4), 9))
    rgba = torch.zeros((1, 4, 2, 2), dtype=torch.uint8)
    assert convert_channels(rgba, 3, "test").shape == (1, 3, 2, 2)


def test_resize_keeps_aspect_and_crops_centre() -> None:
    # 16 x 32 image: black outer quarters, white centre half. A centre crop of the
    # shorter-side resize keeps only the white part; squashing would keep black edges.
    image = torch.zeros((1, 1, 16, 32), dtype=torch.uint8)
    image[..., 8:24] = 255
    out = resize_and_crop(image, 8)
    assert out.shape == (1, 1, 8, 8)
    assert int(out[..., 2:6].min()) == 255
    assert float(out[..., 0].float().mean()) > 128
    # Downscaling antialiases: a fine checkerboard averages to mid-gray.
    checker = torch.from_numpy((np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8))
    small = resize_and_crop(checker.view(1, 1, 32, 32), 8)
    assert int(small.min()) > 100 and int(small.max()) < 155


# ---------------------------------------------------------------- image folders


def make_class_folder(root: Path) -> None:
    save_image(root / "cat" / "a.png", solid(20, 30, (255, 0, 0)))
    save_image(root / "cat" / "b.jpg", solid(40, 40, (0, 0, 255)), quality=95)
    save_image(root / "cat" / "nested" / "c.bmp", solid(10, 10, (0, 255, 0)))
    save_image(root / "dog" / "d.webp", solid(12, 16, (255, 255, 255)), lossless=True)
    save_image(root / "dog" / "e.png", solid(8, 8, (128, 128, 128)), mode="L")
    save_image(root / "dog" / "f.png", solid(8, 8, (255, 0, 0)), mode="P")
    save_image(root / "dog" / "g.png", np.full((8, 8), 65535, dtype=np.uint16))
    rgba = np.dstack([solid(8, 8, (0, 0, 255)), np.full((8, 8), 255, np.uint8)])
    save_image(root / "dog" / "h.png", rgba)
    (root / "dog" / "notes.txt").write_text("not an image, ignored by extension")
    (root / ".hidden").mkdir()
    save_image(root / ".hidden" / "x.png", solid(8, 8, (1, 2, 3)))


def test_image_folder_with_classes(tmp_path: Path) -> None:
    make_class_folder(tmp_path)
    image_set = load_dataset(config(str(tmp_path), image_size=8, channels=3))
    assert image_set.images.shape == (8, 3, 8, 8)
    assert image_set.names == [
        "cat/a.png",
        "cat/b.jpg",
        "cat/nested/c.bmp",
        "dog/d.webp",
        "dog/e.png",
        "dog/f.png",
        "dog/g.png",
        "dog/h.png",
    ]
    assert image_set.labels is not None
    assert image_set.labels.tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert image_set.num_classes == 2
    centre = image_set.images[:, :, 4, 4].tolist()
    assert centre[0] == [255, 0, 0]
    assert abs(centre[1][2] - 255) <= 3 and centre[1][0] <= 3  # JPEG blue, lossy
    assert centre[2] == [0, 255, 0]
    assert centre[3] == [255, 255, 255]
    assert centre[4] == [128, 128, 128]  # gray repeated
    assert centre[5] == [255, 0, 0]  # palette
    assert centre[6] == [255, 255, 255]  # 16-bit gray scaled to 8 bits
    assert centre[7] == [0, 0, 255]  # alpha dropped
    assert image_set.report is not None and image_set.report.format == "imagefolder"


def test_image_folder_gray_output(tmp_path: Path) -> None:
    make_class_folder(tmp_path)
    image_set = load_dataset(config(str(tmp_path), image_size=8, channels=1))
    assert image_set.images.shape == (8, 1, 8, 8)
    assert int(image_set.images[0, 0, 4, 4]) == 76  # red through PIL's luma


def test_flat_folder_has_no_labels(tmp_path: Path) -> None:
    save_image(tmp_path / "one.png", solid(8, 8, (10, 20, 30)))
    save_image(tmp_path / "two.PNG", solid(9, 9, (10, 20, 30)))
    save_image(tmp_path / "more" / "three.jpeg", solid(16, 16, (10, 20, 30)))
    image_set = load_dataset(config(str(tmp_path), image_size=8))
    assert len(image_set) == 3 and not image_set.has_labels
    assert image_set.num_classes is None
    assert image_set.names == ["more/three.jpeg", "one.png", "two.PNG"]
    as_uri = load_dataset(config(f"file://{tmp_path}", image_size=8))
    assert torch.equal(as_uri.images, image_set.images)


def test_folder_limit_is_seeded(tmp_path: Path) -> None:
    for index in range(12):
        save_image(tmp_path / f"{index:02d}.png", solid(8, 8, (index, 0, 0)))
    first = load_dataset(config(str(tmp_path), image_size=8, limit=4), seed=1)
    again = load_dataset(config(str(tmp_path), image_size=8, limit=4), seed=1)
    assert len(first) == 4 and first.names == again.names
    assert first.names is not None
    reds = [int(name[:2]) for name in first.names]
    assert first.images[:, 0, 0, 0].tolist() == reds
    others = {
        tuple(load_dataset(config(str(tmp_path), image_size=8, limit=4), seed=s).names or [])
        for s in range(2, 6)
    }
    assert len(others | {tuple(first.names)}) > 1


def make_corrupt_folder(root: Path) -> None:
    for index in range(3):
        save_image(root / f"good{index}.png", solid(8, 8, (0, 0, 0)))
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buffer, format="PNG"
    )
    (root / "truncated.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("hello, not a picture")


def test_corrupt_images_skipped_and_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_corrupt_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        image_set = load_dataset(config(str(tmp_path), image_size=8, on_corrupt="skip"))
    assert image_set.names == ["good0.png", "good1.png", "good2.png"]
    skipped = dict(image_set.skipped)
    assert sorted(skipped) == ["empty.jpg", "text.png", "truncated.png"]
    assert "empty" in skipped["empty.jpg"]
    assert all(reason for reason in skipped.values())
    assert image_set.report is not None and image_set.report.num_skipped == 3
    assert "3 unreadable" in image_set.report.summary()
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "truncated.png" in warning and "empty.jpg" in warning and "text.png" in warning


def test_corrupt_image_fails_when_asked(tmp_path: Path) -> None:
    make_corrupt_folder(tmp_path)
    with pytest.raises(CorruptImageError) as info:
        load_dataset(config(str(tmp_path), image_size=8, on_corrupt="fail"))
    message = str(info.value)
    assert "empty.jpg" in message  # first corrupt file in sorted order
    assert "on_corrupt" in message and "skip" in message


def test_limit_refills_after_corrupt_files(tmp_path: Path) -> None:
    make_corrupt_folder(tmp_path)
    for seed in range(4):
        image_set = load_dataset(config(str(tmp_path), image_size=8, limit=3), seed=seed)
        assert image_set.names == ["good0.png", "good1.png", "good2.png"]


def test_all_corrupt_or_empty_folder_names_path(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="none of the 1 image files"):
        load_dataset(config(str(tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=re.escape(str(empty))):
        load_dataset(config(str(empty)))
    with pytest.raises(DatasetError, match="no such file"):
        load_dataset(config(str(tmp_path / "missing")))


# ---------------------------------------------------------------- IDX


def write_idx_dir(root: Path, compress: bool, count: int = 6) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (count, 8, 8), dtype=np.uint8)
    labels = np.arange(count, dtype=np.uint8) % 3
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        for stem, array in (
            (f"{prefix}-images-idx3-ubyte", images),
            (f"{prefix}-labels-idx1-ubyte", labels),
        ):
            data = idx_bytes(array if prefix == "train" else array[:2])
            if compress:
                (root / f"{stem}.gz").write_bytes(gzip.compress(data))
            else:
                (root / stem).write_bytes(data)
    return images, labels


@pytest.mark.parametrize("compress", [False, True])
def test_idx_directory(tmp_path: Path, compress: bool) -> None:
    images, labels = write_idx_dir(tmp_path, compress)
    image_set = load_dataset(config(str(tmp_path), image_size=8, channels=1))
    assert image_set.report is not None and image_set.report.format == "idx"
    assert np.array_equal(image_set.images[:, 0].numpy(), images)
    assert image_set.labels is not None and image_set.labels.tolist() == labels.tolist()
    assert image_set.num_classes == 3
    test_set = load_dataset(config(str(tmp_path), image_size=8, channels=1, split="test"))
    assert len(test_set) == 2


def test_idx_single_file_with_and_without_labels(tmp_path: Path) -> None:
    images, labels = write_idx_dir(tmp_path, compress=False)
    single = load_dataset(config(str(tmp_path / "train-images-idx3-ubyte"), image_size=8))
    assert single.labels is not None and single.labels.tolist() == labels.tolist()
    lonely = tmp_path / "lonely" / "data-images-idx3-ubyte"
    lonely.parent.mkdir()
    lonely.write_bytes(idx_bytes(images))
    unlabelled = load_dataset(config(str(lonely), image_size=16, channels=3))
    assert unlabelled.images.shape == (6, 3, 16, 16) and not unlabelled.has_labels


def test_idx_bad_magic_and_truncation_name_file(tmp_path: Path) -> None:
    images = np.zeros((4, 8, 8), dtype=np.uint8)
    bad = tmp_path / "bad-images-idx3-ubyte"
    bad.write_bytes(b"\x12\x34" + idx_bytes(images)[2:])
    with pytest.raises(DatasetError, match=r"bad-images-idx3-ubyte: bad IDX magic"):
        load_dataset(config(str(bad)))
    short = tmp_path / "short-images-idx3-ubyte"
    short.write_bytes(idx_bytes(images)[:-10])
    with pytest.raises(DatasetError, match=r"short-images-idx3-ubyte: truncated IDX data"):
        load_dataset(config(str(short)))
    broken_gz = tmp_path / "gz" / "train-images-idx3-ubyte.gz"
    broken_gz.parent.mkdir()
    data = gzip.compress(idx_bytes(images))
    broken_gz.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"train-images-idx3-ubyte.gz: broken or truncated"):
        load_dataset(config(str(broken_gz.parent)))


def test_idx_label_count_mismatch(tmp_path: Path) -> None:
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((4, 8, 8), np.uint8)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(DatasetError, match="3 labels for 4 images"):
        load_dataset(config(str(tmp_path)))


def test_idx_wide_dtype_parsed_big_endian(tmp_path: Path) -> None:
    values = np.array([[[0, 1], [254, 255]]], dtype=np.int16)
    path = tmp_path / "wide-images-idx3-ubyte"
    path.write_bytes(idx_bytes(values, type_code=0x0B))
    image_set = load_dataset(config(str(path), image_size=8, channels=1))
    corner = image_set.images[0, 0]
    assert int(corner[0, 0]) == 0 and int(corner[-1, -1]) == 255


def test_real_fashion_mnist_installed() -> None:
    # CI installs dataset-fashion-mnist; this test must fail (not skip) without it.
    assert FASHION_MNIST.is_dir(), "apt-get install dataset-fashion-mnist"
    image_set = load_dataset(config(str(FASHION_MNIST), image_size=28, channels=1, limit=64))
    assert image_set.images.shape == (64, 1, 28, 28) and image_set.num_classes == 10
    raw_labels = gzip.decompress((FASHION_MNIST / "train-labels-idx1-ubyte.gz").read_bytes())
    raw_images = gzip.decompress((FASHION_MNIST / "train-images-idx3-ubyte.gz").read_bytes())
    assert struct.unpack(">4I", raw_images[:16]) == (2051, 60000, 28, 28)
    assert image_set.names is not None and image_set.labels is not None
    for position, name in enumerate(image_set.names):
        index = int(name.split("#")[1])
        assert image_set.labels[position] == raw_labels[8 + index]
        pixels = np.frombuffer(raw_images, np.uint8, 784, 16 + 784 * index).reshape(28, 28)
        assert np.array_equal(image_set.images[position, 0].numpy(), pixels)


# ---------------------------------------------------------------- npz


def test_npz_layouts_agree(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    nhwc = rng.integers(0, 256, (5, 10, 10, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0])
    np.savez(tmp_path / "nhwc.npz", images=nhwc, labels=labels)
    np.savez(tmp_path / "nchw.npz", images=nhwc.transpose(0, 3, 1, 2), labels=labels)
    np.savez(tmp_path / "float.npz", images=nhwc.astype(np.float32) / 255.0)
    np.savez(tmp_path / "gray.npz", images=nhwc[..., 0])
    loaded = {
        name: load_dataset(config(str(tmp_path / f"{name}.npz"), image_size=10))
        for name in ("nhwc", "nchw", "float", "gray")
    }
    expected = torch.from_numpy(nhwc.transpose(0, 3, 1, 2).copy())
    for name in ("nhwc", "nchw", "float"):
        assert torch.equal(loaded[name].images, expected), name
    assert loaded["nhwc"].labels is not None and loaded["nhwc"].labels.tolist() == labels.tolist()
    assert loaded["nhwc"].num_classes == 3 and not loaded["float"].has_labels
    gray = loaded["gray"].images
    assert torch.equal(gray[:, 0], expected[:, 0]) and torch.equal(gray[:, 1], gray[:, 0])


def test_npz_bad_content_named(tmp_path: Path) -> None:
    path = tmp_path / "wrong.npz"
    np.savez(path, pixels=np.zeros((2, 8, 8), np.uint8), targets=np.zeros(2))
    with pytest.raises(DatasetError, match=r"wrong.npz: no 'images'.*pixels, targets"):
        load_dataset(config(str(path)))
    hot = tmp_path / "hot.npz"
    np.savez(hot, images=np.full((2, 8, 8), 3.0))
    with pytest.raises(DatasetError, match=r"float images must lie in \[0, 1\]"):
        load_dataset(config(str(hot)))
    mismatch = tmp_path / "mismatch.npz"
    np.savez(mismatch, images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(3, np.int64))
    with pytest.raises(DatasetError, match="2 images but 3 labels"):
        load_dataset(config(str(mismatch)))
    ambiguous = tmp_path / "ambiguous.npz"
    np.savez(ambiguous, images=np.zeros((2, 3, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"ambiguous\.npz: cannot tell channels"):
        load_dataset(config(str(ambiguous)))
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    with pytest.raises(DatasetError, match=r"garbage\.npz"):
        load_dataset(config(str(garbage)))


# ---------------------------------------------------------------- torchvision datasets


def write_fake_cifar(root: Path, per_batch: int = 2) -> np.ndarray:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(7)
    all_images = rng.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for number, name in enumerate(names):
        rows = slice(number * per_batch, (number + 1) * per_batch)
        batch = {
            "batch_label": name,
            "labels": [(number + i) % 10 for i in range(per_batch)],
            "data": all_images[rows],
            "filenames": [f"{name}_{i}.png" for i in range(per_batch)],
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(batch, handle, protocol=2)
    return all_images.reshape(-1, 3, 32, 32)


def test_fake_cifar10(tmp_path: Path) -> None:
    images = write_fake_cifar(tmp_path)
    image_set = load_dataset(config("torchvision:cifar10", root=str(tmp_path)))
    assert image_set.images.shape == (10, 3, 32, 32)
    assert torch.equal(image_set.images, torch.from_numpy(images[:10]))
    assert image_set.labels is not None
    assert image_set.labels.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    assert image_set.num_classes == 10
    test_set = load_dataset(config(str(tmp_path), split="test", channels=1, image_size=16))
    assert test_set.report is not None and test_set.report.format == "cifar10"
    assert test_set.images.shape == (2, 1, 16, 16)


def test_cifar10_missing_or_hostile(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"dataset.root.*dataset.download"):
        load_dataset(config("torchvision:cifar10", root=str(tmp_path)))
    with pytest.raises(DatasetError, match=r"dataset\.root is not set"):
        load_dataset(config("torchvision:cifar10"))
    for name in ("svhn", "stl10"):
        with pytest.raises(DatasetError, match=r"not found.*dataset\.download: true"):
            load_dataset(config(f"torchvision:{name}", root=str(tmp_path)))
    with pytest.raises(DatasetError, match="unknown torchvision dataset 'mnist'"):
        load_dataset(config("torchvision:mnist", root=str(tmp_path)))
    with pytest.raises(DatasetError, match=r"dataset\.format: 'svhn' conflicts"):
        load_dataset(config("torchvision:cifar10", root=str(tmp_path), format="svhn"))
    write_fake_cifar(tmp_path)
    evil = {"data": np.zeros((1, 3072), np.uint8), "labels": [0], "x": print}
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as handle:
        pickle.dump(evil, handle, protocol=2)
    with pytest.raises(DatasetError, match=r"refusing to load \w+\.print"):
        load_dataset(config("torchvision:cifar10", root=str(tmp_path), split="test"))


def test_fake_svhn(tmp_path: Path) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(8)
    images = rng.integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)  # N, C, H, W
    savemat(
        tmp_path / "train_32x32.mat",
        {"X": images.transpose(2, 3, 1, 0), "y": np.array([[10], [1], [9]], dtype=np.uint8)},
    )
    image_set = load_dataset(config("torchvision:svhn", root=str(tmp_path)))
    assert torch.equal(image_set.images, torch.from_numpy(images))
    assert image_set.labels is not None and image_set.labels.tolist() == [0, 1, 9]


def test_fake_stl10(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rows, cols = np.indices((96, 96))
    image = np.stack([rows, cols, (rows + cols) % 256]).astype(np.uint8)  # C, H, W
    # STL-10 stores each channel column-major (Fortran order).
    (folder / "test_X.bin").write_bytes(image.transpose(0, 2, 1).tobytes() * 2)
    (folder / "test_y.bin").write_bytes(bytes([1, 10]))
    image_set = load_dataset(
        config("torchvision:stl10", root=str(tmp_path), split="test", image_size=96)
    )
    assert torch.equal(image_set.images[0], torch.from_numpy(image))
    assert image_set.labels is not None and image_set.labels.tolist() == [0, 9]


# ---------------------------------------------------------------- s3


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def test_s3_sources(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("SELFAUGMENT_CACHE", str(tmp_path / "cache"))
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="data")
    local = tmp_path / "local"
    local.mkdir()
    images = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(local / "set.npz", images=images, labels=np.arange(4))
    client.upload_file(str(local / "set.npz"), "data", "arrays/set.npz")
    make_class_folder(local / "folder")
    for path in sorted((local / "folder").rglob("*")):
        if path.is_file():
            key = "folders/pets/" + path.relative_to(local / "folder").as_posix()
            client.upload_file(str(path), "data", key)

    from_s3 = load_dataset(config("s3://data/arrays/set.npz", image_size=8))
    assert torch.equal(from_s3.images, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    assert from_s3.source == "s3://data/arrays/set.npz"
    cached = tmp_path / "cache" / "s3" / "data" / "arrays" / "set.npz"
    stamp = cached.stat().st_mtime_ns
    load_dataset(config("s3://data/arrays/set.npz", image_size=8))
    assert cached.stat().st_mtime_ns == stamp  # unchanged object: not fetched again

    folder = load_dataset(config("s3://data/folders/pets", image_size=8))
    expected = load_dataset(config(str(local / "folder"), image_size=8))
    assert folder.names == expected.names
    assert torch.equal(folder.images, expected.images)
    assert folder.labels is not None and expected.labels is not None
    assert torch.equal(folder.labels, expected.labels)

    client.delete_object(Bucket="data", Key="folders/pets/dog/h.png")
    pruned = load_dataset(config("s3://data/folders/pets/", image_size=8))
    assert pruned.names == [name for name in expected.names or [] if name != "dog/h.png"]

    with pytest.raises(DatasetError, match="s3://data/nothing/here: no S3 object"):
        load_dataset(config("s3://data/nothing/here"))
    with pytest.raises(DatasetError, match=r"s3://no-such-bucket/x: S3 request failed"):
        load_dataset(config("s3://no-such-bucket/x"))


# ---------------------------------------------------------------- ImageSet and splits


def test_image_set_subset_and_validation() -> None:
    images = torch.arange(4 * 3 * 2 * 2, dtype=torch.uint8).view(4, 3, 2, 2)
    image_set = ImageSet(images, torch.tensor([0, 1, 0, 1]), 2, list("abcd"), "test")
    part = image_set.subset(np.array([3, 1]))
    assert len(part) == 2 and part.names == ["d", "b"]
    assert torch.equal(part.images, images[[3, 1]])
    assert part.labels is not None and part.labels.tolist() == [1, 1]
    assert part.has_labels and part.num_classes == 2
    masked = image_set.subset(torch.tensor([True, False, False, True]))
    assert masked.names == ["a", "d"]
    with pytest.raises(DatasetError, match="out of range"):
        image_set.subset([4])
    with pytest.raises(DatasetError, match="labels of shape"):
        ImageSet(images, torch.tensor([0, 1]), 2, None, "test")
    with pytest.raises(DatasetError, match="uint8"):
        ImageSet(images.float(), None, None, None, "test")


@pytest.mark.parametrize("n, folds", [(103, 5), (10, 10), (7, 2)])
def test_kfold_partition(n: int, folds: int) -> None:
    splits = kfold_splits(n, folds, seed=11)
    assert len(splits) == folds
    heldouts = [heldout for _, heldout in splits]
    assert np.array_equal(np.sort(np.concatenate(heldouts)), np.arange(n))  # disjoint, cover all
    sizes = [len(heldout) for heldout in heldouts]
    assert max(sizes) - min(sizes) <= 1
    for train, heldout in splits:
        assert len(np.intersect1d(train, heldout)) == 0
        assert len(train) + len(heldout) == n
        assert train.dtype == np.int64 and heldout.dtype == np.int64
    again = kfold_splits(n, folds, seed=11)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))
    other = kfold_splits(n, folds, seed=12)
    if folds < n:  # with n == folds every held-out part is a single image in any order
        assert any(not np.array_equal(a[1], b[1]) for a, b in zip(splits, other, strict=True))


def test_kfold_single_fold_and_errors() -> None:
    [(train, heldout)] = kfold_splits(50, 1, seed=0)
    assert len(heldout) == round(50 * SINGLE_FOLD_HOLDOUT) == 10
    assert np.array_equal(np.sort(np.concatenate([train, heldout])), np.arange(50))
    with pytest.raises(DatasetError, match="folds must be >= 1"):
        kfold_splits(10, 0, seed=0)
    with pytest.raises(DatasetError, match="5 folds need at least 5"):
        kfold_splits(3, 5, seed=0)


def test_holdout_split() -> None:
    train, heldout = holdout_split(100, 0.25, seed=5)
    assert len(heldout) == 25 and len(train) == 75
    assert np.array_equal(np.sort(np.concatenate([train, heldout])), np.arange(100))
    assert np.array_equal(heldout, holdout_split(100, 0.25, seed=5)[1])
    assert not np.array_equal(heldout, holdout_split(100, 0.25, seed=6)[1])
    assert len(holdout_split(3, 0.01, seed=0)[1]) == 1  # never empty
    assert len(holdout_split(3, 0.99, seed=0)[0]) == 1  # never takes everything
    with pytest.raises(DatasetError, match="fraction"):
        holdout_split(10, 1.0, seed=0)
    with pytest.raises(DatasetError, match="at least 2"):
        holdout_split(1, 0.5, seed=0)
