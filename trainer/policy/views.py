"""MoCo views: crop, flip, base transform and policy, composed into one batched augmenter.

`build_augmenter` is the one place an `augment` config becomes the views a model trains or is
scored on: pretraining, the search's stages and the policy scorer all call it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from selfaugment.trainer.config import AugmentConfig
from selfaugment.trainer.policy.augmenter import BatchAugmenter
from selfaugment.trainer.policy.builtins import resolve_policy
from selfaugment.trainer.policy.model import AnyPolicy

Augmenter = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]
CROP_TRANSFORM = "RandomResizedCrop"


def base_augment(name: str, template: AugmentConfig, policy: str = "none") -> AugmentConfig:
    """The views of a stage whose base transform is `name` and whose policy is `policy`.

    'RandomResizedCrop' as base means crop on and no base op; any other op name is applied
    with p = 1 and a random magnitude, without the crop (the paper's single-transform runs).
    """
    if name == CROP_TRANSFORM:
        return template.model_copy(update={"crop": True, "base": "none", "policy": policy})
    return template.model_copy(update={"crop": False, "base": name, "policy": policy})


def build_augmenter(cfg: AugmentConfig, extra: AnyPolicy | str | None = None) -> Augmenter:
    """A callable `(uint8 or float images [B,C,H,W], generator) -> float [0,1] views`.

    Order: random resized crop and flip, the base transform, `cfg.policy`, then `extra`
    (a candidate policy being scored on top of the base augmentation).
    """
    if isinstance(extra, str):
        extra = resolve_policy(extra)
    stages = [
        BatchAugmenter(
            resolve_policy(cfg.base), crop=cfg.crop, crop_scale=cfg.crop_scale, flip=cfg.flip
        )
    ]
    if cfg.policy != "none":
        stages.append(BatchAugmenter(resolve_policy(cfg.policy), crop=False, flip=False))
    if extra is not None:
        stages.append(BatchAugmenter(extra, crop=False, flip=False))
    if len(stages) == 1:
        return stages[0]

    def augment(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for stage in stages:
            images = stage(images, generator)
        return images

    return augment
