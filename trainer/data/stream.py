"""Streaming a prepared dataset: per rank, in a deterministic and resumable epoch order.

`StreamedImages` stands where an in-memory `ImageSet` stands (length, labels, classes,
`subset` for folds and hold-outs), but holds no pixels: item i is prepared sample
`sample_ids[i]`, decoded when read. `loader(...)` is a torch DataLoader whose workers read
and decode; each rank reads only its slice of every global batch (order.step_batches), the
order is a pure function of (seed, epoch) and starts at any step, so an interrupted epoch
resumes exactly. With no shuffle window the order is the in-memory path's own permutation:
the two paths train on the same batches.

Images come at the training size, or at the stored size (`image_size=None`: at most the
storage size on the shorter side, aspect kept) for a `transform` such as a
RandomResizedCrop at the source's detail. A transform runs in the loader worker under a
torch seed drawn from (seed, epoch, position in the epoch), so its random choices do not
depend on the number of workers or on where a run resumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from selfaugment.trainer.data.codec import decode_sample
from selfaugment.trainer.data.order import (
    RankSteps,
    epoch_permutation,
    step_batches,
    windowed_order,
)
from selfaugment.trainer.data.prepared import PreparedDataset
from selfaugment.trainer.data.shard_reader import ShardReader
from selfaugment.trainer.data.types import DatasetError, ImageSet

Transform = Callable[[torch.Tensor], torch.Tensor]
Item = tuple[int, int]  # (prepared sample id, seed for its transform)
# Mixes (seed, epoch, position) into one transform seed; any odd 64-bit constants will do.
_SEED_MIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The torch seed of the transform of the sample at `position` in `epoch`'s order."""
    mixed = (seed * _SEED_MIX[0] + epoch * _SEED_MIX[1] + position * _SEED_MIX[2]) % 2**63
    return int(mixed)


class PreparedSamples(Dataset[tuple[torch.Tensor, int]]):
    """Map-style dataset over a prepared dataset's samples: item (sample id, transform seed)
    to (uint8 [C, H, W], label; -1 without labels). Pickles into loader workers."""

    def __init__(
        self,
        prepared: PreparedDataset,
        image_size: int | None,
        channels: int,
        transform: Transform | None = None,
        reader: ShardReader | None = None,
    ) -> None:
        self.image_size = image_size
        self.channels = channels
        self.transform = transform
        self.kind = prepared.kind
        self.source = prepared.source
        self.shard, self.offset, self.length = prepared.shard, prepared.offset, prepared.length
        self.label = prepared.label
        self.reader = reader if reader is not None else ShardReader(prepared)

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, item: int | Item) -> tuple[torch.Tensor, int]:
        sample, seed = item if isinstance(item, tuple) else (item, item)
        shard = int(self.shard[sample])
        data = self.reader.read(shard, int(self.offset[sample]), int(self.length[sample]))
        try:
            image = decode_sample(data, self.kind, self.image_size, self.channels, self.source)
        except Exception as error:  # a sample that decoded at preparation must decode now
            raise DatasetError(
                f"{self.source}: prepared sample {sample} (shard {shard}) cannot be decoded: "
                f"{type(error).__name__}: {error}"
            ) from None
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                image = self.transform(image)
        return image, int(self.label[sample])


class _StepSampler(Sampler[list[Item]]):
    """Yields one rank's batches of (sample id, transform seed), step by step, computed as
    they are asked for: the sampler holds the epoch's order (8 bytes per item) and no more."""

    def __init__(self, ids: np.ndarray, steps: RankSteps, seed: int, epoch: int) -> None:
        self.ids, self.steps, self.seed, self.epoch = ids, steps, seed, epoch

    def __iter__(self) -> Iterator[list[Item]]:
        for positions in self.steps:
            if len(positions):
                seeds = (sample_seed(self.seed, self.epoch, int(p)) for p in positions)
                yield list(zip(self.ids[positions].tolist(), seeds, strict=True))

    def __len__(self) -> int:
        return sum(1 for positions in self.steps if len(positions))


def collate(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[Any, torch.Tensor]:
    """Images stacked when they share a shape (else a list), labels as int64. Stacking goes
    through default_collate, which in a worker writes the batch into shared memory at once."""
    images = [image for image, _ in batch]
    if all(image.shape == images[0].shape for image in images):
        stacked, labels = default_collate(list(batch))
        return stacked, labels
    return images, torch.tensor([label for _, label in batch], dtype=torch.int64)


@dataclass
class StreamedImages:
    """A prepared dataset (or a subset of it) read on demand; item i is sample sample_ids[i].

    `window` (shards) bounds how many shards an epoch's stretch of reads touches (for a remote
    store with a small cache); None shuffles over everything, as the in-memory path does."""

    prepared: PreparedDataset
    image_size: int | None
    channels: int
    sample_ids: np.ndarray
    window: int | None = None
    cache_dir: Path | None = None
    cache_shards: int | None = None

    def __post_init__(self) -> None:
        ids = np.asarray(self.sample_ids, dtype=np.int64)
        if ids.ndim != 1 or (len(ids) and (ids.min() < 0 or ids.max() >= self.prepared.count)):
            raise DatasetError(
                f"{self.source}: sample ids out of range 0..{self.prepared.count - 1}"
            )
        self.sample_ids = ids

    @property
    def source(self) -> str:
        return self.prepared.source

    @property
    def num_classes(self) -> int | None:
        return self.prepared.num_classes if self.prepared.has_labels else None

    @property
    def labels(self) -> torch.Tensor | None:
        """int64 [N] labels (from the index; no image is read), or None."""
        if not self.prepared.has_labels:
            return None
        return torch.from_numpy(self.prepared.label[self.sample_ids].copy())

    @property
    def has_labels(self) -> bool:
        return self.prepared.has_labels

    def __len__(self) -> int:
        return len(self.sample_ids)

    def subset(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> StreamedImages:
        """Items at `indices` (in that order), as ImageSet.subset: folds and hold-outs."""
        array = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices)
        if array.dtype == np.bool_:
            array = np.flatnonzero(array)
        return replace(self, sample_ids=self.sample_ids[array.astype(np.int64)])

    def in_memory(self, image_size: int | None = None) -> ImageSet:
        """These items decoded into memory (an ImageSet): for a part that fits the budget,
        such as a fold's held-out images that a probe or the scorer reads many times."""
        from selfaugment.trainer.data.memory import load_prepared  # memory.py imports this

        size = image_size if image_size is not None else self.image_size
        if size is None:
            raise DatasetError(f"{self.source}: in_memory needs an image size")
        return load_prepared(
            self.prepared, size, self.channels, self.sample_ids, cache_dir=self.cache_dir
        )

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """Item indices in the order of `epoch`."""
        shard_count = len(self.prepared.index["shards"])
        if self.window is None or self.window >= shard_count:
            return epoch_permutation(len(self), seed, epoch)
        counts = [entry.count for entry in self.prepared.shards]
        order = windowed_order(counts, seed, epoch, self.window)
        item_of = np.full(self.prepared.count, -1, dtype=np.int64)
        item_of[self.sample_ids] = np.arange(len(self))
        items = item_of[order]
        return items[items >= 0]

    def batches(
        self,
        seed: int,
        epoch: int,
        global_batch: int,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        drop_last: bool = True,
    ) -> list[np.ndarray]:
        """Per step from `start_step`: the item indices `rank` reads."""
        order = self.epoch_order(seed, epoch)
        steps = step_batches(len(order), global_batch, rank, world_size, start_step, drop_last)
        return [order[positions] for positions in steps]

    def dataset(self, transform: Transform | None = None) -> PreparedSamples:
        """The map-style dataset the loader reads (items are prepared sample ids)."""
        reader = ShardReader(self.prepared, self.cache_dir, self.cache_shards)
        return PreparedSamples(self.prepared, self.image_size, self.channels, transform, reader)

    def loader(
        self,
        seed: int,
        epoch: int,
        global_batch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start_step: int = 0,
        drop_last: bool = True,
        num_workers: int = 0,
        transform: Transform | None = None,
        pin_memory: bool = False,
    ) -> DataLoader:
        """Batches (uint8 [B, C, H, W], int64 labels [B]) of `rank` for `epoch`, from
        `start_step`; workers decode. Images of different sizes come as a list."""
        order = self.epoch_order(seed, epoch)
        steps = RankSteps(len(order), global_batch, rank, world_size, start_step, drop_last)
        # DataLoader draws its workers' base seed from `generator`, else from torch's global
        # RNG: its own generator keeps the global stream (which training uses) untouched, so
        # where an epoch starts or resumes changes no later random number.
        return DataLoader(
            self.dataset(transform),
            batch_sampler=_StepSampler(self.sample_ids[order], steps, seed, epoch),
            num_workers=num_workers,
            collate_fn=collate,
            pin_memory=pin_memory,
            generator=torch.Generator().manual_seed(sample_seed(seed, epoch, start_step)),
        )

    def stream(
        self,
        seed: int,
        epoch: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
        num_workers: int = 0,
        transform: Transform | None = None,
    ) -> Iterator[tuple[torch.Tensor, int]]:
        """(image, label) one at a time: `rank`'s share of the whole epoch (ranks take turns,
        together covering every item once), from its `start`-th item."""
        loader = self.loader(
            seed,
            epoch,
            world_size,
            rank=rank,
            world_size=world_size,
            start_step=start,
            drop_last=False,
            num_workers=num_workers,
            transform=transform,
        )
        for images, labels in loader:
            for index in range(len(labels)):
                yield images[index], int(labels[index])
