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


def step_batches(
    count: int,
    global_batch: int,
    rank: int = 0,
    world_size: int = 1,
    start_step: int = 0,
    drop_last: bool = True,
) -> list[np.ndarray]:
    """Per step from `start_step`, the positions in the epoch's order that `rank` reads.

    drop_last=True (training) leaves out the last count % global_batch positions; False
    (evaluation) splits that last partial batch among the ranks as evenly as possible, so the
    ranks together cover every position exactly once."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DatasetError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
    if global_batch < 1 or global_batch % world_size:
        raise DatasetError(
            f"global batch {global_batch} is not a positive multiple of the {world_size} ranks"
        )
    local = global_batch // world_size
    total = steps_per_epoch(count, global_batch, drop_last)
    if not 0 <= start_step <= total:
        raise DatasetError(f"start step {start_step} is outside the epoch's {total} steps")
    batches = []
    for step in range(start_step, total):
        first = step * global_batch
        if first + global_batch <= count:
            begin = first + rank * local
            batches.append(np.arange(begin, begin + local))
        else:
            batches.append(np.array_split(np.arange(first, count), world_size)[rank])
    return batches
