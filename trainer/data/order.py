"""The order of an epoch and each rank's part of it: pure functions of (seed, epoch).

Both data paths use these, so they visit the same images in the same order:

- `epoch_permutation` is the in-memory training order (trainer/moco/pretrain.py has the same
  formula; phase 2 makes it import this one).
- `windowed_order` is the order for a reader that should not touch every shard at once (a
  remote store with a small local cache): the shards are shuffled, taken `window` at a time,
  and the samples of each window shuffled together. With a window of all shards it is
  `epoch_permutation` itself.
- `step_batches` cuts an order into global batches of `global_batch` and gives rank r the r-th
  `global_batch // world_size` slice of each, as pretrain.py does, so a run on 4 ranks sees the
  same global batches as a run on 1. Starting at `start_step` gives exactly the rest of the
  uninterrupted epoch: resuming mid-epoch replays nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from selfaugment.trainer.data.types import DatasetError

# pretrain.py's epoch_permutation seeds its generator with seed * 100_003 + epoch.
EPOCH_SEED_STRIDE = 100_003
# Salt for the windowed order's generator, so it never shares a stream with other draws.
WINDOW_SALT = 0x5A4D


def epoch_permutation(count: int, seed: int, epoch: int) -> np.ndarray:
    """The in-memory path's data order of `epoch` (int64 indices), identical on every rank."""
    generator = torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
    return torch.randperm(count, generator=generator).numpy()


def windowed_order(
    shard_counts: list[int] | np.ndarray, seed: int, epoch: int, window: int | None
) -> np.ndarray:
    """A permutation of range(sum(shard_counts)) whose consecutive stretches each draw from
    only `window` shards (samples numbered shard by shard). None, or at least the number of
    shards, gives epoch_permutation."""
    counts = np.asarray(shard_counts, dtype=np.int64)
    total = int(counts.sum())
    if window is None or window >= len(counts):
        return epoch_permutation(total, seed, epoch)
    if window < 1:
        raise DatasetError(f"shuffle window must be at least 1 shard, got {window}")
    rng = np.random.default_rng([WINDOW_SALT, seed, epoch])
    starts = np.concatenate([[0], np.cumsum(counts)])
    shard_order = rng.permutation(len(counts))
    parts = []
    for first in range(0, len(shard_order), window):
        members = [np.arange(starts[s], starts[s + 1]) for s in shard_order[first : first + window]]
        samples = np.concatenate(members)
        parts.append(samples[rng.permutation(len(samples))])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def steps_per_epoch(count: int, global_batch: int, drop_last: bool = True) -> int:
    """Global steps in an epoch of `count` samples."""
    return count // global_batch if drop_last else -(-count // global_batch)


@dataclass(frozen=True)
class RankSteps:
    """One rank's steps of an epoch of `count` positions, from `start_step`: a sequence of
    position arrays computed on demand (a few integers, whatever the epoch's length).

    drop_last=True (training) leaves out the last count % global_batch positions; False
    (evaluation) splits that last partial batch among the ranks as evenly as possible, so the
    ranks together cover every position exactly once."""

    count: int
    global_batch: int
    rank: int = 0
    world_size: int = 1
    start_step: int = 0
    drop_last: bool = True

    def __post_init__(self) -> None:
        world, rank = self.world_size, self.rank
        if world < 1 or not 0 <= rank < world:
            raise DatasetError(f"rank {rank} is not in 0..{world - 1} (world size {world})")
        if self.global_batch < 1 or self.global_batch % world:
            raise DatasetError(
                f"global batch {self.global_batch} is not a positive multiple of the {world} ranks"
            )
        total = steps_per_epoch(self.count, self.global_batch, self.drop_last)
        if not 0 <= self.start_step <= total:
            raise DatasetError(f"start step {self.start_step} is outside the epoch's {total} steps")

    def __len__(self) -> int:
        return steps_per_epoch(self.count, self.global_batch, self.drop_last) - self.start_step

    def positions(self, step: int) -> np.ndarray:
        """The positions `rank` reads at global step `step` of the epoch."""
        first = step * self.global_batch
        if first + self.global_batch <= self.count:
            begin = first + self.rank * (self.global_batch // self.world_size)
            return np.arange(begin, begin + self.global_batch // self.world_size)
        return np.array_split(np.arange(first, self.count), self.world_size)[self.rank]

    def __iter__(self) -> Iterator[np.ndarray]:
        for step in range(self.start_step, self.start_step + len(self)):
            yield self.positions(step)


def step_batches(
    count: int,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    drop_last: bool = True,
) -> list[np.ndarray]:
    """Per step from `start_step`, the positions in the epoch's order that `rank` reads (see
    RankSteps, which gives them one step at a time)."""
    return list(RankSteps(count, global_batch, rank, world_size, start_step, drop_last))
