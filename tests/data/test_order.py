"""Epoch orders and each rank's part: deterministic, covering, resumable, as pretrain.py slices."""

from __future__ import annotations

import numpy as np
import pytest

from selfaugment.trainer.data import DatasetError, epoch_permutation, step_batches, windowed_order
from selfaugment.trainer.moco import pretrain


def test_epoch_permutation_is_the_training_loops_order() -> None:
    for seed, epoch in ((0, 0), (3, 7)):
        expected = pretrain.epoch_permutation(50, seed, epoch).numpy()
        assert np.array_equal(epoch_permutation(50, seed, epoch), expected)


def test_windowed_order_is_a_seeded_permutation_drawing_from_few_shards() -> None:
    counts = [5, 0, 7, 3, 6, 4, 2]
    shard_of = np.repeat(np.arange(len(counts)), counts)
    order = windowed_order(counts, seed=1, epoch=2, window=2)
    assert sorted(order.tolist()) == list(range(sum(counts)))
    assert np.array_equal(order, windowed_order(counts, seed=1, epoch=2, window=2))
    assert not np.array_equal(order, windowed_order(counts, seed=1, epoch=3, window=2))
    shards = shard_of[order]
    first = {s: int(np.flatnonzero(shards == s)[0]) for s in set(shards.tolist())}
    last = {s: int(np.flatnonzero(shards == s)[-1]) for s in set(shards.tolist())}
    open_at = [sum(first[s] <= p <= last[s] for s in first) for p in range(len(order))]
    assert max(open_at) <= 2  # a reader needs at most `window` shards at any time


def test_a_window_of_every_shard_is_the_in_memory_order() -> None:
    counts = [4, 4, 3]
    assert np.array_equal(windowed_order(counts, 5, 1, None), epoch_permutation(11, 5, 1))
    assert np.array_equal(windowed_order(counts, 5, 1, 3), epoch_permutation(11, 5, 1))
    with pytest.raises(DatasetError, match="window"):
        windowed_order(counts, 5, 1, 0)


def test_ranks_read_their_slice_of_each_global_batch_like_pretrain() -> None:
    count, global_batch, world = 23, 6, 3
    per_rank = [step_batches(count, global_batch, rank, world) for rank in range(world)]
    assert all(len(batches) == count // global_batch for batches in per_rank)
    for step in range(count // global_batch):
        for rank in range(world):  # pretrain.py: first = step * global + rank * local
            first = step * global_batch + rank * (global_batch // world)
            assert per_rank[rank][step].tolist() == list(range(first, first + 2))
        joined = np.concatenate([per_rank[rank][step] for rank in range(world)])
        assert joined.tolist() == step_batches(count, global_batch)[step].tolist()


def test_without_drop_last_the_ranks_cover_every_position_once() -> None:
    count, global_batch, world = 23, 6, 4
    with pytest.raises(DatasetError, match="multiple"):
        step_batches(count, global_batch, 0, world)
    global_batch = 8
    seen = np.concatenate(
        [
            b
            for rank in range(world)
            for b in step_batches(count, global_batch, rank, world, 0, False)
        ]
    )
    assert sorted(seen.tolist()) == list(range(count))


def test_starting_at_a_step_gives_the_rest_of_the_epoch() -> None:
    whole = step_batches(40, 8, 1, 2)
    rest = step_batches(40, 8, 1, 2, start_step=3)
    assert [b.tolist() for b in rest] == [b.tolist() for b in whole[3:]]
    assert step_batches(40, 8, 1, 2, start_step=5) == []
    with pytest.raises(DatasetError, match="start step 6"):
        step_batches(40, 8, 1, 2, start_step=6)
    with pytest.raises(DatasetError, match="rank 2"):
        step_batches(40, 8, 2, 2)
