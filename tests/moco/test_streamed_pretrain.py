"""Pretraining on a prepared dataset streamed from its shards: the same model as in memory, and
an exact resume from a checkpoint written inside an epoch.

Every comparison trains both arms in this process, one after the other, with the same thread
settings (conftest: one thread), so they run the same float operations.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from selfaugment.trainer.config import (
    DatasetConfig,
    EvaluationConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RuntimeConfig,
)
from selfaugment.trainer.data import (
    ImageSet,
    StreamedImages,
    open_images,
    open_prepared_uri,
    prepare_dataset,
)
from selfaugment.trainer.evaluation.pretrained import run_pretrain
from selfaugment.trainer.moco.checkpoint import load_checkpoint
from selfaugment.trainer.store import LocalStore

IMAGES, SIZE = 44, 12  # 44 images at 12 px: 5 steps of 8 per epoch, 4 images left over


class Crash(Exception):
    pass


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(3)
    for index in range(IMAGES):
        path = root / ("a" if index % 2 else "b") / f"{index:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((SIZE + 4, SIZE), Image.Resampling.BILINEAR).save(path)
    return root


def _config(
    dataset: DatasetConfig, epochs: int = 2, checkpoint_steps: int | None = 2
) -> PretrainConfig:
    return PretrainConfig(
        dataset=dataset,
        model=ModelConfig(width=8),
        moco=MocoConfig(dim=16, queue_size=32),
        optim=OptimConfig(epochs=epochs, batch_size=8, lr=0.05, warmup_epochs=1),
        runtime=RuntimeConfig(device="cpu", progress=False, checkpoint_steps=checkpoint_steps),
        evaluation=EvaluationConfig(tasks=[]),
    )


@pytest.fixture()
def dataset(tmp_path: Path) -> tuple[DatasetConfig, object]:
    cfg = DatasetConfig.model_validate(
        {"uri": str(_folder(tmp_path / "images")), "image_size": SIZE, "memory_budget": "1Ki"}
    )
    prepared = prepare_dataset(cfg, LocalStore(tmp_path / "datasets"), 16, shard_size=10)
    return cfg, prepared


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _models_equal(first: Path, second: Path) -> None:
    a, b = load_checkpoint(first)["model"], load_checkpoint(second)["model"]
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


def test_streamed_training_gives_the_in_memory_model(tmp_path: Path, dataset: tuple) -> None:
    cfg_data, prepared = dataset
    budget = cfg_data.memory_budget_bytes
    streamed = open_images(prepared, cfg_data, 0, memory_budget=budget)
    in_memory = open_images(prepared, cfg_data, 0, memory_budget=budget, path="memory")
    assert isinstance(streamed, StreamedImages) and isinstance(in_memory, ImageSet)
    cfg = _config(cfg_data, epochs=1, checkpoint_steps=None)
    workers = cfg.model_copy(update={"runtime": cfg.runtime.model_copy(update={"num_workers": 2})})
    memory_run = run_pretrain(cfg, tmp_path / "memory", in_memory)
    stream_run = run_pretrain(workers, tmp_path / "stream", streamed)  # 2 loader processes
    assert stream_run["loss_history"] == memory_run["loss_history"]
    _models_equal(tmp_path / "memory" / "checkpoint.pt", tmp_path / "stream" / "checkpoint.pt")


def test_a_streamed_run_resumes_mid_epoch_as_if_never_stopped(
    tmp_path: Path, dataset: tuple
) -> None:
    cfg_data, prepared = dataset
    images = open_images(prepared, cfg_data, 0, memory_budget=cfg_data.memory_budget_bytes)
    assert isinstance(images, StreamedImages)
    cfg = _config(cfg_data)  # 2 epochs of 5 steps, a checkpoint every 2 steps inside each
    straight = run_pretrain(cfg, tmp_path / "straight", images)

    calls: list[int] = []

    def crash_in_the_second_epoch() -> None:
        calls.append(1)
        if len(calls) == 3:  # epoch 2, after its step 2 (global step 7)
            raise Crash

    with pytest.raises(Crash):
        run_pretrain(cfg, tmp_path / "resumed", images, on_checkpoint=crash_in_the_second_epoch)
    stopped = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert (stopped["epoch"], stopped["global_step"]) == (1, 7)
    assert len(stopped["rank_state"]) == 1 and len(stopped["loss_history"]) == 1
    torch.manual_seed(1234)  # a new process would start from other RNG states
    np.random.seed(1234)
    random.seed(1234)
    epochs_seen: list[int] = []
    resumed = run_pretrain(
        cfg, tmp_path / "resumed", images, lambda record: epochs_seen.append(record["epoch"])
    )
    assert epochs_seen == [2]
    assert resumed["loss_history"] == straight["loss_history"]
    _models_equal(tmp_path / "straight" / "checkpoint.pt", tmp_path / "resumed" / "checkpoint.pt")


def _ddp_worker(rank: int, port: int, uri: str, image_size: int, output: str, copy: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE="2",
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    cfg_data = DatasetConfig(uri="prepared", image_size=image_size)
    images = open_images(open_prepared_uri(uri), cfg_data, 0, path="stream")
    cfg = _config(cfg_data, epochs=1)  # 5 steps, checkpoints inside the epoch after 2 and 4

    def keep_the_first() -> None:  # the main rank, after the checkpoint at global step 2
        target = Path(copy) / "checkpoint.pt"
        if copy and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(output) / "checkpoint.pt", target)

    run_pretrain(cfg, Path(output), images, on_checkpoint=keep_the_first)


def test_two_ranks_resume_mid_epoch_with_each_ranks_generator(
    tmp_path: Path, dataset: tuple, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    _, prepared = dataset
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = (prepared.uri, SIZE)
    mp.spawn(_ddp_worker, args=(_free_port(), *args, str(straight), str(resumed)), nprocs=2)
    stopped = load_checkpoint(resumed / "checkpoint.pt")
    assert (stopped["epoch"], stopped["global_step"]) == (0, 2)
    first, second = (ranks["generator"] for ranks in stopped["rank_state"])
    assert not torch.equal(first, second)  # each rank's own augmentation stream
    mp.spawn(_ddp_worker, args=(_free_port(), *args, str(resumed), ""), nprocs=2)
    _models_equal(straight / "checkpoint.pt", resumed / "checkpoint.pt")
    losses = [load_checkpoint(run / "checkpoint.pt")["loss_history"] for run in (straight, resumed)]
    assert losses[0] == losses[1]  # each rank's part of the epoch's loss was kept
