"""Augmentation policies: built-ins, files, and fast batched application.

``BatchAugmenter`` is the interface of the MoCo trainer and the policy scorer: it takes
a [B, C, H, W] batch (uint8 or float in [0, 1]) and returns float32 views in [0, 1]:
random resized crop + flip, then the policy with a per-sample sub-policy choice,
per-sample Bernoulli(p), per-sample random signs (and random magnitudes where None).
Each op runs once per batch on the samples that apply it. The policy works on 8-bit values,
as the PIL reference does: the crop's output is rounded to whole levels first, and each op
rounds its result as PIL does, so the views equal the PIL reference applied to the same
draws (``apply_plan_pil``; ``tests/policy/test_agreement.py`` measures how closely).
CPU uint8 batches run on compiled kernels (``augment/compiled.py``: the same draws, the same
views to the last bit, about 2.5x faster); float batches and CUDA tensors on torch ops.

``PolicyTransform`` plugs a policy into a user's own torchvision pipeline; it accepts PIL
images (per-image PIL reference) and CHW tensors (batched path with B = 1)::

    from torchvision import transforms
    from selfaugment.trainer.policy import PolicyTransform, load_policy

    pipeline = transforms.Compose([
        transforms.RandomResizedCrop(32, scale=(0.2, 1.0)),
        transforms.RandomHorizontalFlip(),
        PolicyTransform(load_policy("examples/mocov2-policy.json")),
        transforms.ToTensor(),
    ])
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from selfaugment.trainer.augment import compiled, pil
from selfaugment.trainer.augment.crop import (
    crop_flip_draws,
    random_resized_crop_flip,
    sampling_grid,
)
from selfaugment.trainer.augment.levels import MAX_LEVEL
from selfaugment.trainer.augment.ops import CROP_RATIO, CROP_SCALE, OP_NAMES, OPS
from selfaugment.trainer.augment.tensor import check_images
from selfaugment.trainer.policy.apply import (
    AugmentPlan,
    apply_plan_levels,
    plan_arguments,
    policy_tables,
    sample_plan,
)
from selfaugment.trainer.policy.builtins import resolve_policy
from selfaugment.trainer.policy.model import AnyPolicy, OpSetting, Policy, PolicyError, RandAugment


def apply_policy_pil(policy: AnyPolicy, image: Image.Image, rng: random.Random) -> Image.Image:
    """Per-image reference: one sub-policy uniformly, each op with Bernoulli(p) and its fixed
    direction or a random sign."""
    if isinstance(policy, RandAugment):
        settings: tuple[OpSetting, ...] = tuple(
            OpSetting(rng.choice(OP_NAMES), 1.0, policy.magnitude) for _ in range(policy.num_ops)
        )
    else:
        settings = policy.sub_policies[rng.randrange(len(policy.sub_policies))]
    for setting in settings:
        if rng.random() >= setting.probability:
            continue
        magnitude = rng.random() if setting.magnitude is None else setting.magnitude
        sign = setting.direction or (-1.0 if rng.random() < 0.5 else 1.0)
        spec = OPS[setting.op]
        image = spec.pil(image, float(spec.argument(magnitude, sign)), rng)
    return image


def apply_plan_pil(image: Image.Image, plan: AugmentPlan, index: int) -> Image.Image:
    """The PIL reference of sample ``index`` of ``plan``: the same ops, magnitudes, signs and
    Cutout centres that ``BatchAugmenter`` applies to that sample."""
    for position, op_id in enumerate(plan.op_ids[index]):
        if op_id < 0:
            continue
        spec = OPS[OP_NAMES[op_id]]
        magnitude, sign = plan.magnitudes[index, position], plan.signs[index, position]
        argument = float(spec.argument(float(magnitude), float(sign)))
        if spec.name == "Cutout":
            if plan.centers is None:
                raise ValueError("apply_plan_pil: the plan has no Cutout centres")
            across, down = plan.centers[index, position]
            center = (float(across) * image.width, float(down) * image.height)
            image = pil.cutout(image, argument, None, center=center)
        else:
            image = spec.pil(image, argument, None)
    return image


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch intra-op threads, then restore the caller's."""
    previous = torch.get_num_threads()
    if previous == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class BatchAugmenter:
    """Random resized crop + flip + policy on a batch; returns float32 in [0, 1].

    ``cpu_threads`` (default 1): torch threads for a batch on the CPU; None keeps the caller's
    setting. One, because augmenting a batch of small images is a hundred short ops, and at
    every op OpenMP threads wait for each other: when another process holds a core, the op
    waits for the descheduled thread: on a shared 2-core machine two threads ran 8 to 55 times
    slower than one at load averages of 3 to 7, for 1.3-1.9x faster when it was quiet
    (``benchmarks/bench_augment.py`` measures both). The training step, whose ops are long,
    keeps the caller's threads.
    """

    def __init__(
        self,
        policy: AnyPolicy | str,
        *,
        crop: bool = True,
        crop_scale: tuple[float, float] = CROP_SCALE,
        flip: bool = True,
        crop_ratio: tuple[float, float] = CROP_RATIO,
        policy_first: bool = False,
        cpu_threads: int | None = 1,
    ) -> None:
        self.policy: AnyPolicy = resolve_policy(policy) if isinstance(policy, str) else policy
        if not isinstance(self.policy, Policy | RandAugment):
            raise PolicyError(
                f"BatchAugmenter: policy must be a Policy or RandAugment, got {policy!r}"
            )
        low, high = crop_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"crop_scale: must satisfy 0 < low <= high <= 1, got {crop_scale}")
        if not 0.0 < crop_ratio[0] <= crop_ratio[1]:
            raise ValueError(f"crop_ratio: must satisfy 0 < low <= high, got {crop_ratio}")
        self.crop, self.flip = crop, flip
        self.crop_scale, self.crop_ratio = crop_scale, crop_ratio
        self.policy_first = policy_first
        if cpu_threads is not None and cpu_threads < 1:
            raise ValueError(f"cpu_threads: must be at least 1 or None, got {cpu_threads}")
        self.cpu_threads = cpu_threads
        self._has_ops = isinstance(self.policy, RandAugment) or any(self.policy.sub_policies)
        self._tables = policy_tables(self.policy) if isinstance(self.policy, Policy) else None

    def __repr__(self) -> str:
        name = self.policy.name
        return (
            f"BatchAugmenter(policy={name!r}, crop={self.crop}, crop_scale={self.crop_scale}, "
            f"flip={self.flip}, policy_first={self.policy_first}, cpu_threads={self.cpu_threads})"
        )

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment a [B, C, H, W] batch (uint8, or float in [0, 1]) on its own device.

        Crop and flip, then the policy (``policy_first``: the policy, then crop and flip, the
        order of Fast AutoAugment and SelfAugment's code; docs/concepts.md says why ours is
        the default). The caller's batch is never modified. A CPU batch is augmented with
        ``cpu_threads`` torch threads (the caller's setting is restored afterwards).
        """
        check_images(images)
        if images.device.type != "cpu" or self.cpu_threads is None:
            return self._augment(images, generator)
        with torch_threads(self.cpu_threads):
            return self._augment(images, generator)

    def _augment(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        if compiled.use_compiled(images):
            return self._augment_compiled(images, generator)
        uint8 = images.dtype == torch.uint8
        if not self._has_ops:  # crop and flip only: [0, 1] values, not rounded
            if uint8:
                views = images.float().div_(MAX_LEVEL)
            else:
                views = images.to(torch.float32, copy=not (self.crop or self.flip))
            return self._crop_flip(views, generator)
        levels = images.float() if uint8 else images.to(torch.float32).mul(MAX_LEVEL)
        if self.policy_first:
            if not uint8:
                levels = levels.round_().clamp_(0.0, MAX_LEVEL)
            levels = self._policy(levels, generator)
            return self._crop_flip(levels, generator).div_(MAX_LEVEL)
        levels = self._crop_flip(levels, generator)
        if not uint8 or self.crop or self.flip:  # PIL's crop and images hold whole levels
            levels = levels.round_() if uint8 else levels.round_().clamp_(0.0, MAX_LEVEL)
        return self._policy(levels, generator).div_(MAX_LEVEL)

    def _augment_compiled(self, images: Tensor, generator: torch.Generator | None) -> Tensor:
        """The compiled path (``augment/compiled.py``): the draws of ``_augment`` in its order,
        the pixel work in one compiled loop; the same result."""
        batch, _, height, width = images.shape

        def grid() -> tuple[np.ndarray, np.ndarray] | None:
            if not self.crop and not self.flip:
                return None
            boxes, flips = crop_flip_draws(
                batch, height, width, generator, self.crop, self.flip,
                self.crop_scale, self.crop_ratio,
            )  # fmt: skip
            return sampling_grid(boxes, flips, height, width)

        def plan() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            drawn = sample_plan(self.policy, batch, generator, self._tables)
            return plan_arguments(drawn, generator)

        if not self._has_ops:
            return compiled.augment(images, grid(), None, policy_first=True)
        if self.policy_first:
            drawn = plan()
            return compiled.augment(images, grid(), drawn, policy_first=True)
        crop_flip = grid()
        return compiled.augment(images, crop_flip, plan(), policy_first=False)

    def _crop_flip(self, levels: Tensor, generator: torch.Generator | None) -> Tensor:
        return random_resized_crop_flip(
            levels, generator, self.crop, self.flip, self.crop_scale, self.crop_ratio
        )

    def _policy(self, levels: Tensor, generator: torch.Generator | None) -> Tensor:
        """The policy on whole levels (float32 0..255), as PIL applies it to 8-bit images."""
        plan = sample_plan(self.policy, levels.shape[0], generator, self._tables)
        return apply_plan_levels(levels, plan, generator)


class PolicyTransform:
    """Apply a policy inside a torchvision pipeline, to PIL images or CHW tensors.

    PIL images go through ``apply_policy_pil``; tensors (uint8 or float in [0, 1]) through
    the batched path with B = 1 and keep their dtype. Without a seed, randomness comes
    from the global ``random``/``torch`` generators (re-seeded per DataLoader worker).
    """

    def __init__(self, policy: AnyPolicy | str, seed: int | None = None) -> None:
        self.policy: AnyPolicy = resolve_policy(policy) if isinstance(policy, str) else policy
        self._augmenter = BatchAugmenter(self.policy, crop=False, flip=False)
        self._rng = random.Random(seed) if seed is not None else None
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __repr__(self) -> str:
        return f"PolicyTransform(policy={self.policy.name!r})"

    def __call__(self, image: Image.Image | Tensor) -> Image.Image | Tensor:
        if isinstance(image, Image.Image):
            rng = self._rng if self._rng is not None else random.Random(random.getrandbits(64))
            return apply_policy_pil(self.policy, image, rng)
        if not isinstance(image, Tensor) or image.ndim != 3:
            raise TypeError(f"PolicyTransform: expected a PIL image or a CHW tensor, got {image!r}")
        result = self._augmenter(image[None], self._generator)[0]
        if image.dtype == torch.uint8:
            return result.mul_(255.0).round_().to(torch.uint8)
        return result.to(image.dtype)
