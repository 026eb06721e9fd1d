"""Linear probes: frozen backbone proven unchanged, the three tasks, folded heads, run_eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from selfaugment.trainer.config import (
    DatasetConfig,
    EvalConfig,
    EvaluationConfig,
    MocoConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    ProbeConfig,
    RuntimeConfig,
)
from selfaugment.trainer.data import ImageSet, load_dataset
from selfaugment.trainer.evaluation.probes import (
    JIGSAW_PERMUTATIONS,
    ProbeError,
    extract_features,
    rotation_features,
    run_eval,
    train_probe,
)
from selfaugment.trainer.moco.checkpoint import CHECKPOINT_KIND, save_checkpoint
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import ResNetBackbone, build_backbone

PROBE = ProbeConfig(epochs=15, batch_size=128, lr=0.1)


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    return load_dataset(DatasetConfig(uri="sklearn:digits", image_size=16, channels=1, limit=600))


def _backbone(seed: int = 0) -> ResNetBackbone:
    torch.manual_seed(seed)
    return build_backbone(ModelConfig(width=8), 1)


class DriftingBackbone(nn.Module):
    """A backbone that changes a buffer on every forward, even in eval mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.inner(images)


def test_train_mode_backbone_is_frozen_and_restored(digits: ImageSet) -> None:
    backbone = _backbone().train()
    backbone.bn1.weight.requires_grad = True
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    train_probe(backbone, "rotation", digits.images[:400], digits.images[400:], PROBE)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert backbone.training and backbone.bn1.weight.requires_grad


def test_a_changing_backbone_is_caught(digits: ImageSet) -> None:
    with pytest.raises(ProbeError, match="calls"):
        train_probe(
            DriftingBackbone(_backbone()),
            "rotation",
            digits.images[:64],
            digits.images[64:96],
            PROBE,
        )


def test_rotation_features_are_the_rotated_images_features(digits: ImageSet) -> None:
    backbone = _backbone().eval()
    images = digits.images[:8]
    features = rotation_features(backbone, images, torch.device("cpu"))
    with torch.no_grad():
        expected = backbone(torch.rot90(images.float() / 255.0, 3, (2, 3)))
    torch.testing.assert_close(features[:, 3], expected)


@pytest.mark.dynamics
def test_rotation_probe_and_folded_head(digits: ImageSet) -> None:
    backbone = _backbone()
    train, test = digits.images[:450], digits.images[450:]
    result = train_probe(backbone, "rotation", train, test, PROBE, seed=3)
    print(f"\nrotation probe, random width-8 backbone, 600 digits: {result}")
    assert result.num_classes == 4 and result.epochs == PROBE.epochs
    assert result.accuracy > 0.40  # chance 0.25
    # The returned head reads raw features: it reproduces the reported held-out figures.
    head = nn.Linear(backbone.feature_dim, 4)
    head.load_state_dict(result.head_state)
    features = rotation_features(backbone.eval(), test, torch.device("cpu")).flatten(0, 1)
    targets = torch.arange(4).repeat(test.shape[0])
    with torch.no_grad():
        logits = head(features)
    assert (logits.argmax(1) == targets).float().mean().item() == pytest.approx(result.accuracy)
    assert nn.functional.cross_entropy(logits, targets).item() == pytest.approx(
        result.loss, rel=1e-4
    )
    again = train_probe(backbone, "rotation", train, test, PROBE, seed=3)
    assert again.accuracy == result.accuracy and again.loss == result.loss


@pytest.mark.dynamics
def test_linear_probe_needs_labels_and_learns(digits: ImageSet) -> None:
    backbone = _backbone()
    with pytest.raises(ProbeError, match="unlabelled-set"):
        train_probe(
            backbone,
            "linear",
            digits.images[:64],
            digits.images[64:96],
            PROBE,
            dataset_name="unlabelled-set",
        )
    assert digits.labels is not None
    result = train_probe(
        backbone,
        "linear",
        digits.images[:450],
        digits.images[450:],
        PROBE,
        train_labels=digits.labels[:450],
        test_labels=digits.labels[450:],
        num_classes=10,
    )
    print(f"linear probe, random width-8 backbone: {result}")
    assert result.num_classes == 10 and result.accuracy > 0.5  # chance 0.1


@pytest.mark.dynamics
def test_jigsaw_probe(digits: ImageSet) -> None:
    backbone = _backbone()
    result = train_probe(backbone, "jigsaw", digits.images[:450], digits.images[450:], PROBE)
    print(f"jigsaw probe, random width-8 backbone: {result}")
    assert result.num_classes == 24 and len(JIGSAW_PERMUTATIONS) == 24
    assert result.head_state["weight"].shape == (24, 4 * backbone.feature_dim)
    assert result.accuracy > 2.0 / 24  # chance 1/24
    with pytest.raises(ProbeError, match="unknown task"):
        train_probe(backbone, "colour", digits.images[:8], digits.images[8:16], PROBE)


def test_extract_features_accepts_uint8_and_float(digits: ImageSet) -> None:
    backbone = _backbone().eval()
    device = torch.device("cpu")
    from_uint8 = extract_features(backbone, digits.images[:20], device, batch_size=7)
    from_float = extract_features(backbone, digits.images[:20].float() / 255.0, device)
    torch.testing.assert_close(from_uint8, from_float)


def test_run_eval_writes_eval_json(tmp_path: Path) -> None:
    cfg = PretrainConfig(
        dataset=DatasetConfig(uri="sklearn:digits", image_size=16, channels=1, limit=300),
        model=ModelConfig(width=8),
        moco=MocoConfig(dim=16, queue_size=64),
        optim=OptimConfig(epochs=1, batch_size=32),
    )
    torch.manual_seed(0)
    model = MoCo(build_backbone(cfg.model, 1), cfg.moco)
    save_checkpoint(
        tmp_path / "checkpoint.pt",
        {
            "schema_version": 1,
            "kind": CHECKPOINT_KIND,
            "config": cfg.model_dump(mode="json"),
            "in_channels": 1,
            "epoch": 1,
            "model": model.state_dict(),
        },
    )
    eval_cfg = EvalConfig(
        checkpoint=str(tmp_path / "checkpoint.pt"),
        dataset=cfg.dataset,
        evaluation=EvaluationConfig(tasks=["rotation", "linear"], probe=ProbeConfig(epochs=3)),
        runtime=RuntimeConfig(device="cpu"),
    )
    report = run_eval(eval_cfg, tmp_path / "eval")
    written = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert written == report and written["schema_version"] == 1
    assert set(written["tasks"]) == {"rotation", "linear"}
    assert 0.0 <= written["tasks"]["linear"]["accuracy"] <= 1.0
