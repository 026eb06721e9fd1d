"""Policy scoring by forward passes: side-effect free, seeded, consistent with the probe."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from selfaugment.trainer.config import (
    DatasetConfig,
    MocoConfig,
    ModelConfig,
    PretrainConfig,
    ProbeConfig,
)
from selfaugment.trainer.data import load_dataset
from selfaugment.trainer.evaluation.probes import train_probe
from selfaugment.trainer.evaluation.scoring import PolicyScorer
from selfaugment.trainer.moco.checkpoint import CHECKPOINT_KIND, save_checkpoint
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone


class StandInAugmenter:
    """Test stand-in for the views + policy: 'identity', 'flip' (random) or 'invert'."""

    def __init__(self, policy: str) -> None:
        self.policy = policy

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = images.float() / 255.0
        if self.policy == "invert":
            return 1.0 - x
        if self.policy == "flip":
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            return torch.where(flip[:, None, None, None], torch.flip(x, dims=(3,)), x)
        return x


@pytest.fixture(scope="module")
def setup() -> tuple[MoCo, torch.Tensor, torch.Tensor]:
    data = load_dataset(DatasetConfig(uri="sklearn:digits", image_size=16, channels=1, limit=400))
    torch.manual_seed(0)
    model = MoCo(build_backbone(ModelConfig(width=8), 1), MocoConfig(dim=16, queue_size=64))
    model.train()
    with torch.no_grad():  # a few training-mode steps: BN statistics, queue and key encoder move
        for start in range(0, 128, 32):
            batch = data.images[start : start + 32].float() / 255.0
            model(batch, torch.flip(batch, dims=(3,)))
    return model, data.images[:300], data.images[300:]


def _state(model: MoCo) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_scores_leave_the_model_bit_identical_and_repeat(setup) -> None:
    model, train, heldout = setup
    probe = train_probe(model.backbone, "rotation", train, heldout, ProbeConfig(epochs=5))
    model.train()
    before = _state(model)
    scorer = PolicyScorer(
        model,
        probe.head_state,
        heldout,
        "cpu",
        batch_size=32,
        seed=5,
        augmenter_factory=StandInAugmenter,
    )
    first = scorer.score("flip")
    second = scorer.score("flip")
    inverted = scorer.score("invert")
    after = _state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert first == second
    assert inverted != first
    assert 0.0 <= first.rotation_accuracy <= 1.0 and first.infonce > 0.0
    print(f"\nscores: flip {first}, invert {inverted}")


def test_identity_score_matches_the_probe(setup) -> None:
    model, train, heldout = setup
    probe = train_probe(model.backbone, "rotation", train, heldout, ProbeConfig(epochs=5))
    scorer = PolicyScorer(
        model, probe.head_state, heldout, "cpu", batch_size=64, augmenter_factory=StandInAugmenter
    )
    score = scorer.score("identity")
    assert score.rotation_accuracy == pytest.approx(probe.accuracy, abs=1e-6)
    assert score.rotation_loss == pytest.approx(probe.loss, rel=1e-4)
    loss, _ = model.contrastive_loss_eval(heldout.float() / 255.0, heldout.float() / 255.0)
    assert score.infonce == pytest.approx(loss.item(), rel=1e-4)


def test_from_checkpoint_and_bad_head(setup, tmp_path: Path) -> None:
    model, train, heldout = setup
    cfg = PretrainConfig(model=ModelConfig(width=8), moco=MocoConfig(dim=16, queue_size=64))
    save_checkpoint(
        tmp_path / "checkpoint.pt",
        {
            "schema_version": 1,
            "kind": CHECKPOINT_KIND,
            "config": cfg.model_dump(mode="json"),
            "in_channels": 1,
            "model": model.state_dict(),
        },
    )
    probe = train_probe(model.backbone, "rotation", train, heldout, ProbeConfig(epochs=3))
    direct = PolicyScorer(model, probe.head_state, heldout, augmenter_factory=StandInAugmenter)
    loaded = PolicyScorer.from_checkpoint(
        tmp_path / "checkpoint.pt", probe.head_state, heldout, augmenter_factory=StandInAugmenter
    )
    assert loaded.score("flip") == direct.score("flip")
    with pytest.raises(ValueError, match="4-way"):
        PolicyScorer(model, {"weight": torch.zeros(3, 64), "bias": torch.zeros(3)}, heldout)


def test_supervised_oracle_loss_uses_the_linear_head() -> None:
    """With a linear head and labels, the scorer adds the supervised cross-entropy."""
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(width=4), in_channels=1)
    model = MoCo(backbone, MocoConfig(dim=8, queue_size=32))
    images = (torch.rand(12, 1, 16, 16) * 255).to(torch.uint8)
    labels = torch.arange(12) % 3
    rotation = {"weight": torch.zeros(4, backbone.feature_dim), "bias": torch.zeros(4)}
    linear = {"weight": torch.zeros(3, backbone.feature_dim), "bias": torch.zeros(3)}

    def identity_views(_policy: object):
        return lambda batch, generator=None: batch.float() / 255

    scorer = PolicyScorer(
        model,
        rotation,
        images,
        batch_size=5,
        augmenter_factory=identity_views,
        linear_head=linear,
        labels=labels,
    )
    score = scorer.score(None)
    # zero heads predict uniformly: cross-entropy is log(classes)
    assert score.supervised_loss == pytest.approx(math.log(3), rel=1e-5)
    assert score.rotation_loss == pytest.approx(math.log(4), rel=1e-5)
    plain = PolicyScorer(model, rotation, images, augmenter_factory=identity_views).score(None)
    assert plain.supervised_loss is None and "supervised_loss" not in plain.to_dict()
    with pytest.raises(ValueError, match="one label per held-out image"):
        PolicyScorer(model, rotation, images, linear_head=linear, labels=labels[:3])


class _Stop:
    """A race that stops every candidate (or none) and records what it was shown."""

    def __init__(self, stop: bool) -> None:
        self.stop = stop
        self.seen: list[int] = []

    def should_stop(self, per_image: dict[str, torch.Tensor], total: int) -> bool:
        self.seen.append(int(per_image["infonce"].shape[0]))
        assert set(per_image) >= {"rotation_loss", "infonce", "correct"} and total == 100
        return self.stop


def test_a_race_sees_growing_shares_and_may_stop_a_candidate_early(setup) -> None:
    model, train, heldout = setup
    probe = train_probe(model.backbone, "rotation", train, heldout, ProbeConfig(epochs=2))
    scorer = PolicyScorer(
        model, probe.head_state, heldout, "cpu", batch_size=64, augmenter_factory=StandInAugmenter
    )
    full = scorer.score("identity")
    assert full.images == 100
    never = _Stop(False)
    raced_in_full = scorer.score("identity", never)
    # chunks of max(16, ceil(100 / 8)) images; asked after every chunk but the last
    assert never.seen == [16, 32, 48, 64, 80, 96]
    assert raced_in_full.images == 100
    assert raced_in_full.rotation_loss == pytest.approx(full.rotation_loss, rel=1e-6)
    assert raced_in_full.infonce == pytest.approx(full.infonce, rel=1e-6)
    always = _Stop(True)
    stopped = scorer.score("identity", always)
    assert stopped.images == 16 and always.seen == [16]


def test_cache_sized_chunks_on_the_cpu_give_the_scores_of_one_batch(setup, monkeypatch) -> None:
    """The scorer and feature extraction run the backbone in chunks on the CPU; in eval mode
    that changes no score beyond float rounding (compared with one batch in the same run)."""
    from selfaugment.trainer.evaluation.probes import extract_features
    from selfaugment.trainer.moco import models

    model, train, heldout = setup
    probe = train_probe(model.backbone, "rotation", train, heldout, ProbeConfig(epochs=2))
    chunk = models.inference_chunk(model.backbone, (16, 16), torch.device("cpu"), 4 * 100)
    monkeypatch.setattr(models, "CPU_CHUNK_BYTES", 8 * 16 * 16 * 4 * 24)  # 24 images a chunk
    assert models.inference_chunk(model.backbone, (16, 16), torch.device("cpu"), 400) == 24
    assert models.inference_chunk(model.backbone, (16, 16), torch.device("meta"), 400) == 400

    def score_and_features() -> tuple[object, torch.Tensor]:
        scorer = PolicyScorer(
            model, probe.head_state, heldout, "cpu", batch_size=100, seed=3,
            augmenter_factory=StandInAugmenter,
        )  # fmt: skip
        features = extract_features(model.backbone.eval(), heldout, torch.device("cpu"))
        return scorer.score("flip"), features

    chunked, chunked_features = score_and_features()
    monkeypatch.setattr(models, "CPU_CHUNK_BYTES", 2**62)  # one batch
    whole, whole_features = score_and_features()
    assert chunk == 400  # the default budget holds 400 images of 16 px at width 8
    # a logit tie broken the other way by rounding moves one image's rotation at most
    assert chunked.rotation_accuracy == pytest.approx(whole.rotation_accuracy, abs=2 / 400)
    assert chunked.rotation_loss == pytest.approx(whole.rotation_loss, rel=1e-5)
    assert chunked.infonce == pytest.approx(whole.infonce, rel=1e-5)
    assert torch.allclose(chunked_features, whole_features, rtol=1e-4, atol=1e-5)
