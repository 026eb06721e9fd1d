"""The in-memory path from a prepared dataset, the choice by memory budget, and equality of
images across load_dataset, the prepared in-memory path and the streamed path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data import (
    DatasetError,
    ImageSet,
    PreparedDataset,
    StreamedImages,
    decoded_bytes,
    load_dataset,
    load_prepared,
    open_images,
    prepare_dataset,
    select_samples,
)
from selfaugment.trainer.store import LocalStore

STORAGE_SIZE = 32


def config(uri: str | Path, **fields: object) -> DatasetConfig:
    return DatasetConfig.model_validate({"uri": str(uri), **fields})


def streamed_images(streamed: StreamedImages) -> torch.Tensor:
    """Every item of `streamed`, in item order, through the loader."""
    loader = streamed.loader(0, 0, 1, drop_last=False)
    order = streamed.epoch_order(0, 0)
    images = torch.stack([batch[0] for batch, _ in loader])
    result = torch.empty_like(images)
    result[torch.from_numpy(order)] = images
    return result


@pytest.mark.parametrize("channels", [1, 3])
def test_streamed_in_memory_and_load_dataset_give_the_same_images(
    prepared: PreparedDataset, image_folder: Path, channels: int
) -> None:
    cfg = config(image_folder, image_size=24, channels=channels)
    direct = load_dataset(cfg)
    in_memory = open_images(prepared, cfg, path="memory")
    streamed = open_images(prepared, cfg, path="stream")
    assert isinstance(in_memory, ImageSet) and isinstance(streamed, StreamedImages)
    assert torch.equal(streamed_images(streamed), in_memory.images)  # every image, exactly
    assert in_memory.names == direct.names and in_memory.skipped == direct.skipped
    assert torch.equal(in_memory.labels, direct.labels)  # type: ignore[arg-type]
    for index, name in enumerate(direct.names or []):
        with Image.open(image_folder / name) as original:
            kept_as_is = min(original.size) <= STORAGE_SIZE
        if kept_as_is:  # the same bytes through the same decoder
            assert torch.equal(in_memory.images[index], direct.images[index]), name
        else:  # resized twice (source -> 32 -> 24): close, not equal
            difference = in_memory.images[index].float() - direct.images[index].float()
            assert difference.abs().mean() < 4.0, name


def test_array_sources_give_load_datasets_images_and_limit_picks_the_same(
    tmp_path: Path,
) -> None:
    prepared = prepare_dataset(config("sklearn:digits"), LocalStore(tmp_path), 16)
    for limit, seed in ((None, 0), (100, 3)):
        cfg = config("sklearn:digits", image_size=16, channels=3, limit=limit)
        direct = load_dataset(cfg, seed=seed)
        in_memory = open_images(prepared, cfg, seed, path="memory")
        assert isinstance(in_memory, ImageSet)
        assert in_memory.names == direct.names
        assert torch.equal(in_memory.images, direct.images)
    streamed = open_images(prepared, cfg, seed, path="stream")
    assert isinstance(streamed, StreamedImages) and len(streamed) == 100
    assert torch.equal(streamed_images(streamed), in_memory.images)


def test_limit_skips_corrupt_files_as_load_dataset_does(
    prepared: PreparedDataset, image_folder: Path
) -> None:
    for seed in range(6):
        cfg = config(image_folder, image_size=16, limit=5)
        direct = load_dataset(cfg, seed=seed)
        assert prepared.names(select_samples(prepared, 5, seed)) == direct.names
    assert len(select_samples(prepared, 50, 0)) == prepared.count


def test_the_memory_budget_decides_the_path(prepared: PreparedDataset, image_folder: Path) -> None:
    cfg = config(image_folder, image_size=16, channels=3)
    size = decoded_bytes(12, 3, 16)
    assert size == 12 * 3 * 16 * 16
    assert isinstance(open_images(prepared, cfg, memory_budget=size), ImageSet)
    chosen = open_images(prepared, cfg, memory_budget=size - 1)
    assert isinstance(chosen, StreamedImages) and len(chosen) == 12
    assert chosen.num_classes == 2 and chosen.labels is not None
    assert chosen.labels.tolist() == prepared.label.tolist()


def test_a_training_size_above_the_storage_size_is_refused(
    prepared: PreparedDataset, image_folder: Path
) -> None:
    assert prepared.index["downscaled"] == 5  # the 40 and 64 px images
    with pytest.raises(DatasetError, match="image_size 48 is larger than the storage size 32"):
        open_images(prepared, config(image_folder, image_size=48))


def test_a_training_size_above_the_storage_size_is_fine_when_nothing_was_downscaled(
    tmp_path: Path,
) -> None:
    prepared = prepare_dataset(config("sklearn:digits"), LocalStore(tmp_path), 8)
    assert prepared.index["downscaled"] == 0
    cfg = config("sklearn:digits", image_size=16, channels=1, limit=20)
    in_memory = open_images(prepared, cfg, path="memory")
    assert torch.equal(in_memory.images, load_dataset(cfg).images)  # type: ignore[union-attr]


def test_load_prepared_of_a_subset_keeps_its_order(prepared: PreparedDataset) -> None:
    whole = load_prepared(prepared, 16, 3)
    ids = np.array([7, 0, 11, 3])
    part = load_prepared(prepared, 16, 3, ids)
    assert torch.equal(part.images, whole.images[torch.from_numpy(ids)])
    assert part.names == [whole.names[i] for i in ids]  # type: ignore[index]
    assert part.report is not None and part.report.num_images == 4


def test_decoded_images_are_kept_on_the_machine_and_read_back(
    prepared: PreparedDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second load of the same selection reads the machine's decoded cache (no shard is
    decoded), a damaged cache file is decoded again and replaced, and a selection above the
    size limit or with keep_decoded=False leaves no file."""
    from selfaugment.trainer.data import memory

    monkeypatch.setenv("SELFAUGMENT_CACHE", str(tmp_path / "cache"))
    ids = np.array([5, 1, 9])
    first = load_prepared(prepared, 16, 3, ids)
    path = memory.decoded_cache_path(prepared, 16, 3, ids)
    assert path.is_file()

    def no_decoding(*args: object) -> torch.Tensor:
        raise AssertionError("decoded again although the cache holds these images")

    with monkeypatch.context() as patched:
        patched.setattr(memory, "_decode_all", no_decoding)
        again = load_prepared(prepared, 16, 3, ids)
    assert torch.equal(again.images, first.images) and again.names == first.names

    path.write_bytes(path.read_bytes()[:-7])  # truncated: not trusted, decoded again
    repaired = load_prepared(prepared, 16, 3, ids)
    assert torch.equal(repaired.images, first.images)
    assert memory._read_decoded(path, tuple(first.images.shape)) is not None

    other = memory.decoded_cache_path(prepared, 16, 1, ids)
    assert other != path  # another size, channel count or selection is another file
    load_prepared(prepared, 16, 1, ids, keep_decoded=False)
    assert not other.exists()
    monkeypatch.setattr(memory, "DECODED_CACHE_MAX_BYTES", 3 * 16 * 16)
    load_prepared(prepared, 16, 1, ids)
    assert other.exists()  # 3 x 1 x 16 x 16 bytes fit
    largest = memory.decoded_cache_path(prepared, 16, 3, np.array([0, 2, 4]))
    load_prepared(prepared, 16, 3, np.array([0, 2, 4]))
    assert not largest.exists()  # 3 x 3 x 16 x 16 bytes do not
