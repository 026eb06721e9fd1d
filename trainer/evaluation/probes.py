"""Linear probes on a frozen backbone: rotation (label-free), supervised linear, and jigsaw.

- rotation (Gidaris et al. 2018; the SelfAugment evaluation): every image in its 4 rotations
  (0/90/180/270 degrees, torch.rot90), a 4-way linear head on the frozen features.
- linear: a linear classifier on the dataset's labels.
- jigsaw (Noroozi & Favaro 2016, 2x2 variant of the SelfAugment paper): the 4 quadrants are
  shuffled by one of the 4! = 24 permutations and a 24-way linear head reads the concatenated
  features of the tiles in shuffled order. Tiles are fed to the backbone at tile size (half
  the side; the ResNet pools globally, so no resizing and no interpolation artefacts). As the
  backbone sees each tile alone, tile features are computed once and any permutation is a
  re-ordering of them: training draws fresh permutations every epoch at no cost.

Frozen properly: the backbone is put in eval mode with requires_grad off, features are
computed once under no_grad, and its state_dict is compared bit for bit afterwards
(ProbeError if anything changed). Features are standardised with training-set statistics
while the head trains; that affine map is folded into the returned head, so `head_state` is
a plain nn.Linear applied to raw backbone features (what PolicyScorer loads).
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from selfaugment import RESULT_SCHEMA_VERSION
from selfaugment.errors import SelfAugmentError
from selfaugment.trainer.config import EvalConfig, EvaluationConfig, ProbeConfig
from selfaugment.trainer.data.stream import StreamedImages
from selfaugment.trainer.data.types import Images
from selfaugment.trainer.moco.checkpoint import save_checkpoint
from selfaugment.trainer.moco.models import inference_chunk
from selfaugment.trainer.runtime import autocast, resolve_device, use_bf16

ProbeTask = Literal["rotation", "linear", "jigsaw"]
TASKS: tuple[str, ...] = ("rotation", "linear", "jigsaw")
JIGSAW_PERMUTATIONS = torch.tensor(list(itertools.permutations(range(4))))  # 24 x 4
FEATURE_BATCH = 256


class ProbeError(SelfAugmentError):
    """A probe cannot run (missing labels, bad task) or the backbone changed while frozen."""


@dataclass
class ProbeResult:
    """Held-out accuracy and mean cross-entropy of a trained linear head."""

    task: str
    accuracy: float
    loss: float
    train_accuracy: float
    epochs: int
    num_classes: int
    head_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers (without the head weights)."""
        return {
            "accuracy": self.accuracy,
            "loss": self.loss,
            "train_accuracy": self.train_accuracy,
            "epochs": self.epochs,
            "num_classes": self.num_classes,
        }


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images -> float32 [0, 1]."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images.float()


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    *,
    transform: Any = None,
    bf16: bool = False,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Backbone features [N, D] (float32, on `device`) of images, optionally transformed first.

    `batch_size`: images per forward pass; by default FEATURE_BATCH, or on the CPU as many as
    stay in cache (models.inference_chunk: up to 5x faster than large batches there)."""
    if batch_size is None:
        size = (int(images.shape[-2]), int(images.shape[-1]))
        batch_size = inference_chunk(backbone, size, device, FEATURE_BATCH)
    chunks = []
    for start in range(0, images.shape[0], batch_size):
        batch = to_unit_float(images[start : start + batch_size].to(device, non_blocking=True))
        if transform is not None:
            batch = transform(batch)
        with autocast(device, bf16):
            chunks.append(backbone(batch).float())
    return torch.cat(chunks)


def rotation_features(
    backbone: nn.Module, images: torch.Tensor, device: torch.device, bf16: bool = False
) -> torch.Tensor:
    """Features of the 4 rotations: [N, 4, D], rotation r is r x 90 degrees counter-clockwise."""
    per_rotation = [
        extract_features(
            backbone, images, device, bf16=bf16, transform=lambda x, r=r: torch.rot90(x, r, (2, 3))
        )
        for r in range(4)
    ]
    return torch.stack(per_rotation, dim=1)


def jigsaw_tile_features(
    backbone: nn.Module, images: torch.Tensor, device: torch.device, bf16: bool = False
) -> torch.Tensor:
    """Features of the 2x2 tiles at tile size: [N, 4, D] (top-left, top-right, bottom-left, ...)."""
    half_h, half_w = images.shape[2] // 2, images.shape[3] // 2
    tiles = [
        extract_features(
            backbone,
            images,
            device,
            bf16=bf16,
            transform=lambda x, i=i, j=j: x[
                :, :, i * half_h : (i + 1) * half_h, j * half_w : (j + 1) * half_w
            ],
        )
        for i in range(2)
        for j in range(2)
    ]
    return torch.stack(tiles, dim=1)


def _jigsaw_samples(
    tile_features: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One random permutation per image: concatenated shuffled tile features [N, 4D], labels [N]."""
    count = tile_features.shape[0]
    labels = torch.randint(0, len(JIGSAW_PERMUTATIONS), (count,), generator=generator)
    order = JIGSAW_PERMUTATIONS[labels].to(tile_features.device)  # N x 4
    shuffled = torch.gather(
        tile_features, 1, order.unsqueeze(-1).expand(-1, -1, tile_features.shape[2])
    )
    return shuffled.flatten(1), labels.to(tile_features.device)


def _evaluate(
    head: nn.Linear, features: torch.Tensor, targets: torch.Tensor
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of `head` on features."""
    with torch.no_grad():
        logits = head(features)
        loss = F.cross_entropy(logits, targets).item()
        accuracy = (logits.argmax(1) == targets).float().mean().item()
    return loss, accuracy


def _train_head(
    sample: Any,
    in_dim: int,
    num_classes: int,
    mean: torch.Tensor,
    std: torch.Tensor,
    cfg: ProbeConfig,
    device: torch.device,
    generator: torch.Generator,
) -> nn.Linear:
    """SGD (momentum 0.9, cosine per step) on standardised features; returns the folded head."""
    with torch.random.fork_rng(devices=[]):  # seeded init, global RNG left as it was
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
        head = nn.Linear(in_dim, num_classes).to(device)
    optimizer = torch.optim.SGD(
        head.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
    )
    features, _ = sample()
    steps_per_epoch = max(1, math.ceil(features.shape[0] / cfg.batch_size))
    total_steps = cfg.epochs * steps_per_epoch
    step = 0
    for _epoch in range(cfg.epochs):
        features, targets = sample()
        order = torch.randperm(features.shape[0], generator=generator).to(device)
        for start in range(0, features.shape[0], cfg.batch_size):
            index = order[start : start + cfg.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(head((features[index] - mean) / std), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    folded = nn.Linear(in_dim, num_classes).to(device)
    with torch.no_grad():  # W((x - m) / s) + b == (W / s) x + (b - (W / s) m)
        folded.weight.copy_(head.weight / std)
        folded.bias.copy_(head.bias - folded.weight @ mean)
    return folded


def _standardiser(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return features.mean(0), features.std(0).clamp_min(1e-6)


def train_probe(
    backbone: nn.Module,
    task: str,
    train_images: torch.Tensor,
    test_images: torch.Tensor,
    cfg: ProbeConfig,
    *,
    train_labels: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    num_classes: int | None = None,
    device: torch.device | str = "cpu",
    seed: int = 0,
    bf16: bool = False,
    dataset_name: str = "dataset",
) -> ProbeResult:
    """Train a linear `task` head on the frozen backbone; accuracy/loss on `test_images`."""
    if task not in TASKS:
        raise ProbeError(f"evaluation.tasks: unknown task {task!r}; use one of {list(TASKS)}")
    device = torch.device(device)
    backbone.to(device)
    snapshot = {name: value.detach().clone() for name, value in backbone.state_dict().items()}
    was_training = backbone.training
    grad_flags = [param.requires_grad for param in backbone.parameters()]
    backbone.eval()
    for param in backbone.parameters():
        param.requires_grad = False
    generator = torch.Generator().manual_seed(seed)
    try:
        if task == "rotation":
            train = rotation_features(backbone, train_images, device, bf16)
            test = rotation_features(backbone, test_images, device, bf16)
            classes = 4
            train_x, test_x = train.flatten(0, 1), test.flatten(0, 1)  # (N*4) x D
            train_y = torch.arange(4, device=device).repeat(train.shape[0])
            test_y = torch.arange(4, device=device).repeat(test.shape[0])
        elif task == "linear":
            if train_labels is None or test_labels is None:
                raise ProbeError(f"linear evaluation needs labels, but {dataset_name} has none")
            train_x = extract_features(backbone, train_images, device, bf16=bf16)
            test_x = extract_features(backbone, test_images, device, bf16=bf16)
            train_y, test_y = train_labels.to(device).long(), test_labels.to(device).long()
            classes = num_classes or int(max(train_y.max().item(), test_y.max().item())) + 1
            present = int(torch.unique(torch.cat([train_y, test_y])).numel())
            if present < 2:  # any head scores 100%: a figure that says nothing
                raise ProbeError(
                    f"linear evaluation needs at least 2 classes, but {dataset_name} has "
                    f"{present}; evaluate with rotation only (evaluation.tasks)"
                )
        else:
            train = jigsaw_tile_features(backbone, train_images, device, bf16)
            test = jigsaw_tile_features(backbone, test_images, device, bf16)
            classes = len(JIGSAW_PERMUTATIONS)
            test_x, test_y = _jigsaw_samples(test, torch.Generator().manual_seed(seed + 1))
    finally:
        for param, flag in zip(backbone.parameters(), grad_flags, strict=True):
            param.requires_grad = flag
        backbone.train(was_training)
    _check_unchanged(backbone, snapshot)

    if task == "jigsaw":
        tile_mean, tile_std = _standardiser(train.flatten(0, 1))
        mean, std = tile_mean.repeat(4), tile_std.repeat(4)
        train_x, train_y = _jigsaw_samples(train, torch.Generator().manual_seed(seed + 2))

        def sample() -> tuple[torch.Tensor, torch.Tensor]:
            return _jigsaw_samples(train, generator)
    else:
        mean, std = _standardiser(train_x)

        def sample() -> tuple[torch.Tensor, torch.Tensor]:
            return train_x, train_y

    head = _train_head(sample, train_x.shape[1], classes, mean, std, cfg, device, generator)
    loss, accuracy = _evaluate(head, test_x, test_y)
    _, train_accuracy = _evaluate(head, train_x, train_y)
    return ProbeResult(
        task=task,
        accuracy=accuracy,
        loss=loss,
        train_accuracy=train_accuracy,
        epochs=cfg.epochs,
        num_classes=classes,
        head_state={name: value.detach().cpu() for name, value in head.state_dict().items()},
    )


def _check_unchanged(backbone: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Raise ProbeError naming every state_dict entry that differs from `snapshot`."""
    current = backbone.state_dict()
    changed = [
        name
        for name, before in snapshot.items()
        if name not in current or not torch.equal(current[name], before)
    ]
    if changed or set(current) != set(snapshot):
        raise ProbeError(
            f"the frozen backbone changed during the probe (entries: {', '.join(changed[:5])}"
            f"{' ...' if len(changed) > 5 else ''}); its weights must stay bit-identical"
        )


def evaluate_tasks(
    backbone: nn.Module,
    train: Images | StreamedImages,
    test: Images | StreamedImages | None,
    evaluation: EvaluationConfig,
    *,
    device: torch.device,
    seed: int = 0,
    bf16: bool = False,
    memory_budget: int | None = None,
) -> dict[str, ProbeResult]:
    """Run every task of `evaluation`; without `test`, hold out `probe.holdout_fraction` of train.

    Streamed images are read into memory first, half of `memory_budget` (the default budget
    when None) for each part: all of a part that fits, else a seeded sample that does."""
    if not evaluation.tasks:
        return {}
    from selfaugment.trainer.data import DEFAULT_MEMORY_BUDGET, holdout_split, resident

    if test is None:
        train_index, test_index = holdout_split(len(train), evaluation.probe.holdout_fraction, seed)
        train, test = train.subset(train_index), train.subset(test_index)
    share = (DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget) // 2
    train, test = resident(train, share, seed), resident(test, share, seed)
    results: dict[str, ProbeResult] = {}
    for task in evaluation.tasks:
        results[task] = train_probe(
            backbone,
            task,
            train.images,
            test.images,
            evaluation.probe,
            train_labels=train.labels,
            test_labels=test.labels,
            num_classes=train.num_classes,
            device=device,
            seed=seed,
            bf16=bf16,
            dataset_name=train.source,
        )
    return results


def run_eval(cfg: EvalConfig, output_dir: Path) -> dict[str, Any]:
    """Evaluate a checkpoint's frozen backbone; writes output_dir/eval.json and returns it."""
    from selfaugment.trainer.data import load_dataset
    from selfaugment.trainer.moco.checkpoint import load_backbone

    device = resolve_device(cfg.runtime.device)
    backbone, _ = load_backbone(cfg.checkpoint)
    train = load_dataset(cfg.dataset, seed=cfg.runtime.seed)
    test = load_dataset(cfg.test_dataset, seed=cfg.runtime.seed) if cfg.test_dataset else None
    results = evaluate_tasks(
        backbone,
        train,
        test,
        cfg.evaluation,
        device=device,
        seed=cfg.runtime.seed,
        bf16=use_bf16(cfg.runtime, device),
    )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "schema_version": RESULT_SCHEMA_VERSION,
        "checkpoint": cfg.checkpoint,
        "config": cfg.model_dump(mode="json"),
        "tasks": {task: result.summary() for task, result in results.items()},
    }
    (output_dir / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    save_checkpoint(
        output_dir / "probe_heads.pt", {task: result.head_state for task, result in results.items()}
    )
    return report
