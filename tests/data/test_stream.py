"""The streaming reader: deterministic, per-rank, resumable mid-epoch, the in-memory path's
batches, stored-size images with seeded transforms, and shards read from S3 through a cache."""

from __future__ import annotations

from pathlib import Path

import boto3
import numpy as np
import pytest
import torch
from torchvision.transforms import v2

from selfaugment.trainer.config import DatasetConfig
from selfaugment.trainer.data import (
    DatasetError,
    PreparedDataset,
    StreamedImages,
    epoch_permutation,
    load_prepared,
    prepare_dataset,
)
from selfaugment.trainer.data.prepared import shard_tar_key
from selfaugment.trainer.store import open_store

SEED, EPOCH = 4, 1


def streamed(prepared: PreparedDataset, size: int | None = 16, **fields: object) -> StreamedImages:
    return StreamedImages(prepared, size, 3, np.arange(prepared.count), **fields)  # type: ignore[arg-type]


def loader_batches(images: StreamedImages, **options: object) -> list[torch.Tensor]:
    options = {"global_batch": 4, **options}
    return [batch for batch, _ in images.loader(SEED, EPOCH, **options)]  # type: ignore[arg-type]


def test_the_same_seed_and_epoch_give_the_same_batches(prepared: PreparedDataset) -> None:
    images = streamed(prepared)
    first, again = loader_batches(images), loader_batches(images)
    assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    other = [batch for batch, _ in images.loader(SEED, EPOCH + 1, 4)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_ranks_get_the_in_memory_paths_batches(prepared: PreparedDataset) -> None:
    """pretrain.py: order = epoch_permutation; rank r takes data[order[first:first+local]]."""
    data = load_prepared(prepared, 16, 3).images
    order = torch.from_numpy(epoch_permutation(len(data), SEED, EPOCH))
    global_batch, world = 4, 2
    for rank in range(world):
        batches = loader_batches(streamed(prepared), rank=rank, world_size=world)
        for step, batch in enumerate(batches):
            first = step * global_batch + rank * (global_batch // world)
            assert torch.equal(batch, data[order[first : first + 2]])


def test_ranks_together_read_every_image_once(prepared: PreparedDataset) -> None:
    images = streamed(prepared)
    data = load_prepared(prepared, 16, 3).images
    parts = [images.batches(SEED, EPOCH, 3, rank, 3, drop_last=False) for rank in range(3)]
    items = np.concatenate([batch for part in parts for batch in part])
    assert sorted(items.tolist()) == list(range(12))
    rank_1 = list(images.stream(SEED, EPOCH, rank=1, world_size=3))
    expected = np.concatenate(parts[1])
    assert len(rank_1) == len(expected) == 4
    for (image, label), item in zip(rank_1, expected, strict=True):
        assert torch.equal(image, data[item]) and label == prepared.label[item]


def test_resuming_mid_epoch_reads_exactly_the_rest(prepared: PreparedDataset) -> None:
    images = streamed(prepared)
    whole = loader_batches(images, global_batch=2)
    rest = loader_batches(images, global_batch=2, start_step=4, num_workers=2)
    assert len(rest) == len(whole) - 4
    assert all(torch.equal(a, b) for a, b in zip(rest, whole[4:], strict=True))
    items = list(images.stream(SEED, EPOCH))
    tail = list(images.stream(SEED, EPOCH, start=5))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, items[5:], strict=True))


def test_stored_size_images_and_seeded_transforms(prepared: PreparedDataset) -> None:
    images = streamed(prepared, size=None)
    samples = [image for image, _ in images.stream(SEED, EPOCH)]
    assert all(image.dtype == torch.uint8 and image.shape[0] == 3 for image in samples)
    assert max(min(image.shape[1:]) for image in samples) == 32  # downscaled to the storage size
    assert min(min(image.shape[1:]) for image in samples) == 20  # kept as it was
    crop = v2.RandomResizedCrop(12, scale=(0.2, 1.0), antialias=True)
    plain = loader_batches(images, transform=crop)
    workers = loader_batches(images, transform=crop, num_workers=2)
    resumed = loader_batches(images, transform=crop, start_step=1)
    assert plain[0].shape == (4, 3, 12, 12)
    assert all(torch.equal(a, b) for a, b in zip(plain, workers, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(plain[1:], resumed, strict=True))


def test_a_subset_is_read_like_an_image_set_subset(prepared: PreparedDataset) -> None:
    part = streamed(prepared).subset(np.array([9, 2, 5, 11, 0]))
    assert len(part) == 5 and part.labels is not None
    assert part.labels.tolist() == prepared.label[[9, 2, 5, 11, 0]].tolist()
    assert np.array_equal(part.epoch_order(SEED, EPOCH), epoch_permutation(5, SEED, EPOCH))
    data = load_prepared(prepared, 16, 3).images
    for (image, _), item in zip(
        part.stream(SEED, EPOCH), part.epoch_order(SEED, EPOCH), strict=True
    ):
        assert torch.equal(image, data[[9, 2, 5, 11, 0][item]])
    in_memory = part.in_memory()
    assert torch.equal(in_memory.images, data[[9, 2, 5, 11, 0]])
    assert in_memory.labels is not None and in_memory.labels.tolist() == part.labels.tolist()
    with pytest.raises(DatasetError, match="out of range"):
        StreamedImages(prepared, 16, 3, np.array([12]))


def test_a_shuffle_window_keeps_reads_within_few_shards(prepared: PreparedDataset) -> None:
    images = streamed(prepared, window=1)
    order = images.epoch_order(SEED, EPOCH)
    assert sorted(order.tolist()) == list(range(12))
    shards = prepared.shard[order]
    assert (np.diff(shards) != 0).sum() == 2  # one shard after another, each shuffled inside
    assert len(loader_batches(images)) == 3


def test_streaming_from_s3_through_a_local_cache(
    s3_server: str, tmp_path: Path, image_folder: Path, prepared: PreparedDataset
) -> None:
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket="prepared")
    store = open_store("s3://prepared/datasets")
    cfg = DatasetConfig.model_validate({"uri": str(image_folder)})
    remote = prepare_dataset(cfg, store, 32, shard_size=4)
    cache = tmp_path / "cache"
    local_batches = loader_batches(streamed(prepared))
    remote_batches = loader_batches(streamed(remote, cache_dir=cache), num_workers=2)
    assert all(torch.equal(a, b) for a, b in zip(local_batches, remote_batches, strict=True))
    assert sorted(p.name for p in cache.iterdir()) == ["00000.tar", "00001.tar", "00002.tar"]

    small = tmp_path / "small-cache"
    assert len(loader_batches(streamed(remote, cache_dir=small, cache_shards=1))) == 3
    assert len(list(small.iterdir())) == 1  # older downloads deleted

    store.write_bytes(shard_tar_key(remote.key, 0), b"tampered")
    with pytest.raises(DatasetError, match="SHA-256"):
        loader_batches(streamed(remote, cache_dir=tmp_path / "cold"))
