"""Score augmentation policies by forward passes only (SelfAugment, Algorithm 1, step 3).

A candidate policy is applied (after the training crop and flip) to the held-out images D_A;
the scorer reports the rotation loss and accuracy of the trained linear rotation head on the
augmented images (4 rotations each) and the InfoNCE between two augmented views, computed
with the query encoder, the frozen key encoder and the stored queue as negatives. Nothing is
trained: eval mode, no momentum update, no enqueue, so the model stays bit-identical; and the
augmentation generator is re-seeded for every call, so scoring a policy twice gives the same
numbers (and all candidates see the same crops, flips and random draws where they coincide).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from selfaugment.trainer.config import AugmentConfig
from selfaugment.trainer.moco.checkpoint import checkpoint_config, load_checkpoint
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone
from selfaugment.trainer.moco.pretrain import Augmenter
from selfaugment.trainer.policy.views import build_augmenter
from selfaugment.trainer.runtime import autocast

AugmenterFactory = Callable[[Any], Augmenter]


@dataclass(frozen=True)
class PolicyScore:
    """Forward-pass scores of one policy on the held-out images (means over images)."""

    rotation_loss: float
    rotation_accuracy: float
    infonce: float
    supervised_loss: float | None = None

    def to_dict(self) -> dict[str, float]:
        return {key: value for key, value in asdict(self).items() if value is not None}


def rotation_head_from_state(state: dict[str, torch.Tensor]) -> nn.Linear:
    """The 4-way linear rotation head of a ProbeResult.head_state."""
    weight = state.get("weight")
    if weight is None or "bias" not in state or weight.dim() != 2 or weight.shape[0] != 4:
        raise ValueError("rotation head state must hold a 4-way linear layer (weight 4xD, bias 4)")
    head = nn.Linear(weight.shape[1], 4)
    head.load_state_dict(state)
    return head


class PolicyScorer:
    """Scores policies on held-out images kept (uint8) on the device; never changes the model."""

    def __init__(
        self,
        moco_model: MoCo,
        rotation_head: nn.Linear | dict[str, torch.Tensor],
        heldout_images: torch.Tensor,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        *,
        augment: AugmentConfig | None = None,
        augmenter_factory: AugmenterFactory | None = None,
        bf16: bool = False,
        linear_head: dict[str, torch.Tensor] | None = None,
        labels: torch.Tensor | None = None,
    ) -> None:
        if heldout_images.dim() != 4 or heldout_images.shape[0] == 0:
            raise ValueError(
                f"heldout_images must be a non-empty [N, C, H, W] tensor, got {tuple(heldout_images.shape)}"
            )
        if heldout_images.shape[2] != heldout_images.shape[3]:
            raise ValueError(
                "heldout_images must be square (rotations are scored as one batch), "
                f"got {tuple(heldout_images.shape[2:])}"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = moco_model.to(self.device).eval()
        if isinstance(rotation_head, dict):
            rotation_head = rotation_head_from_state(rotation_head)
        if rotation_head.in_features != self.model.backbone.feature_dim:
            raise ValueError(
                f"rotation head reads {rotation_head.in_features} features, "
                f"backbone gives {self.model.backbone.feature_dim}"
            )
        self.rotation_head = rotation_head.to(self.device).eval()
        self.images = heldout_images.to(self.device)
        # Optional supervised oracle: a linear classifier's cross-entropy on the labels.
        self.linear_head: nn.Linear | None = None
        self.labels: torch.Tensor | None = None
        if linear_head is not None:
            if labels is None or labels.shape[0] != heldout_images.shape[0]:
                raise ValueError("a supervised linear head needs one label per held-out image")
            weight = linear_head["weight"]
            self.linear_head = nn.Linear(weight.shape[1], weight.shape[0])
            self.linear_head.load_state_dict(linear_head)
            self.linear_head.to(self.device).eval()
            self.labels = labels.to(self.device).long()
        self.batch_size = batch_size
        self.seed = seed
        self.bf16 = bf16
        self.make_augmenter = augmenter_factory or functools.partial(
            build_augmenter, augment or AugmentConfig.model_validate({})
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        rotation_head_state: dict[str, torch.Tensor],
        heldout_images: torch.Tensor,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        seed: int = 0,
        **kwargs: Any,
    ) -> PolicyScorer:
        """Scorer for the MoCo model (encoders and queue) of a pretrain checkpoint."""
        payload = load_checkpoint(path)
        cfg = checkpoint_config(payload, str(path))
        in_channels = int(payload.get("in_channels", cfg.dataset.channels))
        model = MoCo(build_backbone(cfg.model, in_channels), cfg.moco)
        model.load_state_dict(payload["model"])
        kwargs.setdefault("augment", cfg.augment)
        return cls(model, rotation_head_state, heldout_images, device, batch_size, seed, **kwargs)

    @torch.no_grad()
    def score(self, policy: Any) -> PolicyScore:
        """Rotation loss/accuracy and InfoNCE of the held-out images under `policy`."""
        augmenter = self.make_augmenter(policy)
        self.model.eval()
        self.rotation_head.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        backbone = self.model.backbone
        total = self.images.shape[0]
        rotation_loss = rotation_correct = infonce = supervised = 0.0
        labels = self.labels
        for start in range(0, total, self.batch_size):
            batch = self.images[start : start + self.batch_size]
            count = batch.shape[0]
            view_q = augmenter(batch, generator)
            view_k = augmenter(batch, generator)
            with autocast(self.device, self.bf16):
                # the 4 rotations as one batch (eval mode: batch norm uses its running stats);
                # the upright quarter's features serve the InfoNCE query too: 5 passes, not 6
                rotated = torch.cat([torch.rot90(view_q, turns, (2, 3)) for turns in range(4)])
                raw = backbone(rotated)
                features = raw.float()
                logits = self.rotation_head(features)
                targets = torch.arange(4, device=self.device).repeat_interleave(count)
                rotation_loss += F.cross_entropy(logits, targets, reduction="sum").item()
                rotation_correct += (logits.argmax(1) == targets).sum().item()
                if self.linear_head is not None and labels is not None:
                    supervised += F.cross_entropy(
                        self.linear_head(features[:count]),
                        labels[start : start + count],
                        reduction="sum",
                    ).item()
                loss, _ = self.model.contrastive_loss_eval(None, view_k, query_features=raw[:count])
            infonce += loss.item() * count
        return PolicyScore(
            rotation_loss=rotation_loss / (4 * total),
            rotation_accuracy=rotation_correct / (4 * total),
            infonce=infonce / total,
            supervised_loss=supervised / total if self.linear_head is not None else None,
        )
