"""Pretraining: schedule, exact resume, outputs, init_from / BN-only, DDP on CPU, real digits."""

from __future__ import annotations

import json
import os
import random
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from selfaugment.trainer.config import (
    DatasetConfig,
    EvaluationConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    ProbeConfig,
    RuntimeConfig,
)
from selfaugment.trainer.data import ImageSet, load_dataset
from selfaugment.trainer.evaluation.pretrained import run_pretrain
from selfaugment.trainer.evaluation.probes import train_probe
from selfaugment.trainer.moco.checkpoint import CheckpointError, load_backbone, load_checkpoint
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone
from selfaugment.trainer.moco.pretrain import PretrainError, config_differences, learning_rate
from selfaugment.trainer.runtime import seed_everything


class JitterAugmenter:
    """Test stand-in for BatchAugmenter: random shift, flip and brightness from `generator`."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        count = x.shape[0]
        shift = torch.randint(-2, 3, (2,), generator=generator)
        x = torch.roll(x, shifts=(int(shift[0]), int(shift[1])), dims=(2, 3))
        flip = torch.rand(count, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], torch.flip(x, dims=(3,)), x)
        scale = 0.6 + 0.8 * torch.rand(count, 1, 1, 1, generator=generator)
        return (x * scale).clamp(0.0, 1.0)


def _random_images(count: int = 128, channels: int = 3, size: int = 16) -> ImageSet:
    generator = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (count, channels, size, size), generator=generator)
    return ImageSet(images.to(torch.uint8), None, None, None, "random-test-images")


def _tiny_config(epochs: int = 2, **updates: object) -> PretrainConfig:
    cfg = PretrainConfig(
        model=ModelConfig(width=8),
        moco=MocoConfig(dim=16, queue_size=64),
        optim=OptimConfig(epochs=epochs, batch_size=32, lr=0.05, warmup_epochs=1),
        runtime=RuntimeConfig(device="cpu", progress=False),
        evaluation=EvaluationConfig(tasks=[]),
    )
    return cfg.model_copy(update=updates)


class Crash(Exception):
    pass


def test_learning_rate_warmup_then_cosine() -> None:
    optim = OptimConfig(epochs=10, lr=0.1, warmup_epochs=2)
    assert learning_rate(optim, 0, 5) == pytest.approx(0.01)
    assert learning_rate(optim, 9, 5) == pytest.approx(0.1)
    assert learning_rate(optim, 10, 5) == pytest.approx(0.1)
    assert learning_rate(optim, 30, 5) == pytest.approx(0.05)
    assert learning_rate(optim, 49, 5) < 0.001
    rates = [learning_rate(optim, step, 5) for step in range(10, 50)]
    assert rates == sorted(rates, reverse=True)


def test_resume_after_crash_equals_uninterrupted_run(tmp_path: Path) -> None:
    images, cfg = _random_images(), _tiny_config()
    straight = run_pretrain(cfg, tmp_path / "straight", images, augmenter=JitterAugmenter())

    def crash_after_first_epoch(record: dict) -> None:
        if record["epoch"] == 1:
            raise Crash

    with pytest.raises(Crash):
        run_pretrain(cfg, tmp_path / "resumed", images, crash_after_first_epoch, JitterAugmenter())
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 1
    torch.manual_seed(1234)  # a new process would start from other RNG states
    np.random.seed(1234)
    random.seed(1234)
    epochs_seen: list[int] = []
    resumed = run_pretrain(
        cfg,
        tmp_path / "resumed",
        images,
        lambda record: epochs_seen.append(record["epoch"]),
        JitterAugmenter(),
    )
    assert epochs_seen == [2]
    assert resumed["loss_history"] == straight["loss_history"]
    first = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    second = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert first["model"].keys() == second["model"].keys()
    for name, value in first["model"].items():
        assert torch.equal(value, second["model"][name]), name
    lines = (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_outputs_and_checkpoint_contents(tmp_path: Path) -> None:
    cfg = _tiny_config(epochs=1)
    cfg.evaluation = EvaluationConfig(tasks=["rotation"], probe=ProbeConfig(epochs=2))
    report = run_pretrain(cfg, tmp_path, _random_images(), augmenter=JitterAugmenter())
    written = json.loads((tmp_path / "pretrain.json").read_text())
    assert written == report
    assert report["schema_version"] == 1 and report["epochs"] == 1
    assert report["final_loss"] == report["loss_history"][-1]
    assert set(report["evaluation"]["rotation"]) >= {"accuracy", "loss"}
    assert report["config"]["model"]["width"] == 8
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert set(record) == {"epoch", "loss", "lr", "images_per_second", "time"}
    assert record["images_per_second"] > 0
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert {"config", "epoch", "model", "optimizer", "rng", "loss_history"} <= set(payload)
    assert {"python", "numpy", "torch", "cuda", "generator"} <= set(payload["rng"])
    assert "queue" in payload["model"] and "queue_ptr" in payload["model"]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    backbone, loaded_cfg = load_backbone(tmp_path / "checkpoint.pt")
    assert loaded_cfg == cfg
    assert torch.equal(backbone.conv1.weight, payload["model"]["encoder_q.backbone.conv1.weight"])
    assert (tmp_path / "probe_heads.pt").is_file()


def test_resume_with_a_different_config_names_the_field(tmp_path: Path) -> None:
    images = _random_images(64)
    run_pretrain(_tiny_config(epochs=1), tmp_path, images, augmenter=JitterAugmenter())
    changed = _tiny_config(epochs=1, moco=MocoConfig(dim=16, queue_size=128))
    with pytest.raises(PretrainError, match="moco.queue_size"):
        run_pretrain(changed, tmp_path, images, augmenter=JitterAugmenter())
    assert config_differences(
        {"a": {"b": 1}, "runtime": {"progress": True}},
        {"a": {"b": 2}, "runtime": {"progress": False}},
    ) == ["a.b"]


def test_bad_inputs_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PretrainError, match="optim.batch_size"):
        run_pretrain(_tiny_config(), tmp_path, _random_images(16), augmenter=JitterAugmenter())
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="broken.pt"):
        load_checkpoint(tmp_path / "broken.pt")


def test_init_from_and_batchnorm_only_training(tmp_path: Path) -> None:
    images = _random_images(64)
    run_pretrain(_tiny_config(epochs=1), tmp_path / "source", images, augmenter=JitterAugmenter())
    source, _ = load_backbone(tmp_path / "source" / "checkpoint.pt")
    cfg = _tiny_config(
        epochs=1, init_from=str(tmp_path / "source" / "checkpoint.pt"), trainable="batchnorm"
    )
    run_pretrain(cfg, tmp_path / "target", images, augmenter=JitterAugmenter())
    target, _ = load_backbone(tmp_path / "target" / "checkpoint.pt")
    before, after = source.state_dict(), target.state_dict()
    assert torch.equal(before["conv1.weight"], after["conv1.weight"])  # frozen, from source
    assert torch.equal(before["layer2.0.conv2.weight"], after["layer2.0.conv2.weight"])
    assert not torch.equal(before["bn1.weight"], after["bn1.weight"])  # trained
    assert not torch.equal(before["layer4.1.bn2.bias"], after["layer4.1.bn2.bias"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ddp_worker(rank: int, world_size: int, port: int, output: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    run_pretrain(_tiny_config(epochs=1), Path(output), _random_images(64), None, JitterAugmenter())


def test_ddp_two_processes_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Spawned children unpickle _ddp_worker by module name (tests.moco.test_pretrain): put the
    # repository root on the sys.path that multiprocessing hands to them.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    assert payload["epoch"] == 1 and np.isfinite(payload["loss_history"][0])
    assert int(payload["model"]["queue_ptr"]) == 64 % 64  # 2 steps x 32 global keys, wrapped
    assert json.loads((tmp_path / "pretrain.json").read_text())["epochs"] == 1


def _held_out_infonce(model: MoCo, views: tuple[torch.Tensor, torch.Tensor]) -> float:
    """InfoNCE of two fixed views of held-out images, each image's other view its positive and
    the other images' views its negatives (no queue, eval mode): a loss two models share."""
    model.eval()
    with torch.no_grad():
        q = F.normalize(model.encoder_q(views[0]), dim=1)  # N x C
        k = F.normalize(model.encoder_q(views[1]), dim=1)  # N x C
    logits = q @ k.T / model.temperature  # N x N, positives on the diagonal
    return F.cross_entropy(logits, torch.arange(q.shape[0])).item()


@pytest.mark.dynamics
def test_real_digits_loss_drops_and_rotation_beats_chance(tmp_path: Path) -> None:
    """Training dynamics differ between CPUs and thread counts (other SIMD kernels round
    differently, and a few hundred SGD steps amplify it), so every threshold here is checked
    against a reference from this same run, with margins measured on AVX-512, AVX2 and
    scalar kernels at 1 and 2 threads (ATEN_CPU_CAPABILITY): loss drops 0.66-1.03 (first to last
    epoch) and 0.76-1.19 (held-out, trained against the initial weights); the test asks 0.25."""
    data = load_dataset(DatasetConfig(uri="sklearn:digits", image_size=16, channels=1))
    cfg = PretrainConfig(
        model=ModelConfig(width=8),
        # Without BN in the head this width-8 model starts (and stays) near collapse on
        # digits: features of all images have cosine ~0.94 at init and InfoNCE sits at log(K+1).
        # A key momentum of 0.99 (MoCo's 0.999 scaled to ~200 steps) still leaves it near
        # collapse on some CPUs; 0.9 lets the key encoder follow within an epoch.
        moco=MocoConfig(dim=32, queue_size=256, momentum=0.9, head_batchnorm=True),
        optim=OptimConfig(epochs=8, batch_size=64, lr=0.1),
        runtime=RuntimeConfig(device="cpu", progress=False, checkpoint_every=10),
        evaluation=EvaluationConfig(tasks=["rotation"], probe=ProbeConfig(epochs=30)),
    )
    started = time.perf_counter()
    report = run_pretrain(cfg, tmp_path, data, augmenter=JitterAugmenter())
    seconds = time.perf_counter() - started
    history = report["loss_history"]
    trained_rotation = report["evaluation"]["rotation"]["accuracy"]

    seed_everything(cfg.runtime.seed)  # the initial weights run_pretrain started from
    initial = MoCo(build_backbone(cfg.model, in_channels=1), cfg.moco)
    trained = MoCo(build_backbone(cfg.model, in_channels=1), cfg.moco)
    trained.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt")["model"])
    held_out = data.images[-256:]
    generator = torch.Generator().manual_seed(123)
    views = (JitterAugmenter()(held_out, generator), JitterAugmenter()(held_out, generator))
    initial_loss, trained_loss = (_held_out_infonce(m, views) for m in (initial, trained))

    torch.manual_seed(0)
    random_backbone = build_backbone(cfg.model, in_channels=1)
    split = int(0.8 * len(data))
    random_rotation = train_probe(
        random_backbone,
        "rotation",
        data.images[:split],
        data.images[split:],
        ProbeConfig(epochs=30),
    ).accuracy
    print(
        f"\ndigits ({len(data)} images 1x16x16, resnet18 width 8, {cfg.optim.epochs} epochs, "
        f"{seconds:.1f}s, {torch.get_num_threads()} threads): InfoNCE first epoch "
        f"{history[0]:.3f} -> last {history[-1]:.3f}; held-out InfoNCE initial "
        f"{initial_loss:.3f} -> trained {trained_loss:.3f}; rotation accuracy trained "
        f"{trained_rotation:.3f} vs random init {random_rotation:.3f} (chance 0.25)"
    )
    assert history[-1] < history[0] - 0.25
    assert trained_loss < initial_loss - 0.25
    assert trained_rotation > 0.40


def test_default_views_come_from_the_augment_config(tmp_path: Path) -> None:
    report = run_pretrain(_tiny_config(epochs=1), tmp_path, _random_images(64))  # mocov2 views
    assert np.isfinite(report["final_loss"])


def test_epoch_logger_reports_speed_and_eta_from_recent_epochs() -> None:
    from selfaugment.trainer.moco.pretrain import epoch_logger

    lines: list[str] = []
    on_epoch = epoch_logger(10, lines.append)
    for epoch, seconds in ((1, 30.0), (2, 90.0)):
        on_epoch(
            {"epoch": epoch, "loss": 6.5, "lr": 0.03, "images_per_second": 1234.5, "time": seconds}
        )
    assert lines[0] == "epoch 1/10  loss 6.5000  lr 0.03  1,234 img/s  epoch 0m30s  eta 4m30s"
    # the ETA uses the mean of the recent epochs: 8 epochs left x 60 s
    assert lines[1].endswith("epoch 1m30s  eta 8m00s")
