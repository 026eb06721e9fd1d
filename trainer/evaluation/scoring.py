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
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from selfaugment.trainer.config import AugmentConfig
from selfaugment.trainer.moco.checkpoint import checkpoint_config, load_checkpoint
from selfaugment.trainer.moco.learner import MoCo
from selfaugment.trainer.moco.models import build_backbone, forward_in_chunks, inference_chunk
from selfaugment.trainer.moco.pretrain import Augmenter
from selfaugment.trainer.policy.views import build_augmenter
from selfaugment.trainer.runtime import autocast

AugmenterFactory = Callable[[Any], Augmenter]


@dataclass(frozen=True)
class PolicyScore:
    """Forward-pass scores of one policy on the held-out images (means over images).

    `images`: how many held-out images the means are over (fewer than all when a race
    stopped the candidate early, see `Race`)."""

    rotation_loss: float
    rotation_accuracy: float
    infonce: float
    supervised_loss: float | None = None
    images: int | None = None

    def to_dict(self) -> dict[str, float]:
        return {key: value for key, value in asdict(self).items() if value is not None}


class Race(Protocol):
    """Decides, after each chunk of held-out images, whether a candidate can stop early."""

    def should_stop(self, per_image: dict[str, torch.Tensor], total: int) -> bool:
        """`per_image`: each loss per image scored so far ("rotation_loss", "infonce", and
        "supervised_loss" with a linear head); `total`: the images there are."""
        ...


#: A race looks at the candidate after each of this many equal chunks of the held-out images.
RACE_CHUNKS = 8


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
    def score(self, policy: Any, race: Race | None = None) -> PolicyScore:
        """Rotation loss/accuracy and InfoNCE of the held-out images under `policy`.

        With a `race`, the images are scored in RACE_CHUNKS chunks and the race may stop the
        candidate after any of them; the score is then the mean over the images seen."""
        augmenter = self.make_augmenter(policy)
        self.model.eval()
        self.rotation_head.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.seed)
        total = self.images.shape[0]
        step = self.batch_size
        if race is not None:
            step = min(step, max(16, math.ceil(total / RACE_CHUNKS)))
        parts: dict[str, list[torch.Tensor]] = {"rotation_loss": [], "correct": [], "infonce": []}
        if self.linear_head is not None:
            parts["supervised_loss"] = []
        for start in range(0, total, step):
            batch = self.images[start : start + step]
            for name, values in self._score_batch(augmenter, generator, batch, start).items():
                parts[name].append(values)
            if race is not None and start + step < total:
                seen = {name: torch.cat(values) for name, values in parts.items()}
                if race.should_stop(seen, total):
                    break
        per_image = {name: torch.cat(values) for name, values in parts.items()}
        scored = int(per_image["infonce"].shape[0])
        supervised = per_image.get("supervised_loss")
        return PolicyScore(
            rotation_loss=float(per_image["rotation_loss"].mean()),
            rotation_accuracy=float(per_image["correct"].sum()) / (4 * scored),
            infonce=float(per_image["infonce"].mean()),
            supervised_loss=float(supervised.mean()) if supervised is not None else None,
            images=scored,
        )

    def _score_batch(
        self, augmenter: Augmenter, generator: torch.Generator, batch: torch.Tensor, start: int
    ) -> dict[str, torch.Tensor]:
        """Per-image losses of one batch (float64 on the CPU, so sums do not depend on order)."""
        count = batch.shape[0]
        view_q = augmenter(batch, generator)
        view_k = augmenter(batch, generator)
        out: dict[str, torch.Tensor] = {}
        with autocast(self.device, self.bf16):
            # the 4 rotations as one batch (eval mode: batch norm uses its running stats);
            # the upright quarter's features serve the InfoNCE query too: 5 passes, not 6
            # on the CPU in cache-sized chunks (models.inference_chunk), on a GPU at once
            rotated = torch.cat([torch.rot90(view_q, turns, (2, 3)) for turns in range(4)])
            size = (rotated.shape[-2], rotated.shape[-1])
            chunk = inference_chunk(self.model.backbone, size, self.device, rotated.shape[0])
            raw = forward_in_chunks(self.model.backbone, rotated, chunk)
            features = raw.float()
            logits = self.rotation_head(features)
            targets = torch.arange(4, device=self.device).repeat_interleave(count)
            losses = F.cross_entropy(logits, targets, reduction="none").view(4, count)
            out["rotation_loss"] = losses.mean(0)
            out["correct"] = (logits.argmax(1) == targets).view(4, count).sum(0)
            if self.linear_head is not None and self.labels is not None:
                out["supervised_loss"] = F.cross_entropy(
                    self.linear_head(features[:count]),
                    self.labels[start : start + count],
                    reduction="none",
                )
            _, contrast = self.model.contrastive_loss_eval(
                None, view_k, query_features=raw[:count], chunk=chunk
            )
            positives = torch.zeros(count, dtype=torch.long, device=self.device)
            out["infonce"] = F.cross_entropy(contrast.float(), positives, reduction="none")
        return {name: values.detach().double().cpu() for name, values in out.items()}
