"""The path that trains agrees with the PIL reference along whole chains of ops.

``BatchAugmenter`` (uint8 in, float views out) against ``apply_plan_pil`` replaying the same
plan (the same sub-policy, Bernoulli draws, magnitudes, signs and Cutout centres) image by
image: chains of 2 to 4 ops, every op at every position, several magnitudes.

Why the bounds hold on any CPU and thread count (``augment/levels.py``, ``geometric.py``):
our arithmetic is exact, IEEE-deterministic or PIL's own (fixed-point resampling, rotation
matrices from Python's ``math``), so the one thing that can vary between machines is PIL's
float32 blend: a compiler may fuse its multiply and add on CPUs with FMA, which changes a
truncated result by one level where the product lands within a float32 rounding of a whole
number (a few values in a million), and a discrete op after it can magnify that one value.
The strict test chooses enhance factors that are multiples of 1/16: every product is exact,
so FMA changes nothing and the chains must be identical. The random-magnitude test bounds
the mean and the tail instead, with margins such a value cannot cross.

Run as a script to print the figures: ``.venv/bin/python tests/policy/test_agreement.py``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from selfaugment.trainer.augment.crop import random_resized_crop_flip
from selfaugment.trainer.augment.ops import OP_NAMES, OPS
from selfaugment.trainer.policy import BatchAugmenter, OpSetting, Policy, sample_plan
from selfaugment.trainer.policy.augmenter import apply_plan_pil

SIZE = 32
ENHANCE = ("Contrast", "Color", "Brightness", "Sharpness")
EXACT_FACTORS = (3 / 16, 7 / 16, 11 / 16, 14 / 16)  # enhance factor 1 +- k/16: exact products
OTHER_MAGNITUDES = (0.1, 0.4, 0.7, 1.0)  # no CPU rounds these ops' results differently


def strict_magnitudes(name: str) -> tuple[float, ...]:
    """Magnitudes of ``name`` whose results no CPU rounds differently (module docstring)."""
    spec = OPS[name]
    if name not in ENHANCE:
        return OTHER_MAGNITUDES
    span = spec.max_argument - spec.identity_argument
    return tuple(factor / span for factor in EXACT_FACTORS)


def sample_images() -> torch.Tensor:
    """uint8 [16, 3, 32, 32]: tinted digits (flat areas, few levels: hard for Equalize),
    random RGB, smooth gradients."""
    digits = np.kron(load_digits().images[:10] / 16.0, np.ones((4, 4)))
    tinted = np.stack([digits * 230 + 10, digits * 150 + 60, 200 - digits * 180], axis=1)
    noise = np.random.default_rng(0).integers(0, 256, (3, 3, SIZE, SIZE))
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] * (255 / (SIZE - 1))
    gradients = np.stack([np.stack([xs, ys, (xs + ys) / 2]), np.stack([ys, 255 - xs, xs])])
    gradients = np.concatenate([gradients, gradients[:1, ::-1]])
    batch = np.concatenate([tinted, noise, gradients]).round().clip(0, 255)
    return torch.from_numpy(batch.astype(np.uint8))


def chains(magnitudes: dict[str, tuple[float, ...]] | None, seed: int) -> list[list[OpSetting]]:
    """Every op at every position of chains of 2, 3 and 4 ops; the other ops random. Each op
    cycles through its magnitudes (None: a random magnitude drawn per application)."""
    rng = random.Random(seed)
    result = []
    for length in (2, 3, 4):
        for position in range(length):
            for name in OP_NAMES:
                ops = [rng.choice(OP_NAMES) for _ in range(length)]
                ops[position] = name
                result.append(
                    [
                        OpSetting(
                            op, 1.0, None if magnitudes is None else rng.choice(magnitudes[op])
                        )
                        for op in ops
                    ]
                )
    return result


def to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def differences(chain: Sequence[OpSetting], images: torch.Tensor, seed: int) -> torch.Tensor:
    """|BatchAugmenter - PIL reference| in levels for each value, the same draws for both."""
    policy = Policy([list(chain)])
    views = BatchAugmenter(policy, crop=False, flip=False)(
        images, torch.Generator().manual_seed(seed)
    )
    trained = views.mul(255).round().to(torch.int64)
    assert torch.equal(views * 255, trained.float())  # the views are whole 8-bit levels
    plan = sample_plan(policy, len(images), torch.Generator().manual_seed(seed))
    reference = torch.stack(
        [from_pil(apply_plan_pil(to_pil(image), plan, i)) for i, image in enumerate(images)]
    )
    return (trained - reference.to(torch.int64)).abs()


def measure(all_chains: list[list[OpSetting]], images: torch.Tensor) -> dict[str, float]:
    """Mean and max difference in levels, and the share of values off by more than 3."""
    values = torch.cat(
        [differences(chain, images, seed=index).flatten() for index, chain in enumerate(all_chains)]
    ).float()
    return {
        "chains": len(all_chains),
        "mean": values.mean().item(),
        "max": values.max().item(),
        "over_3": (values > 3).float().mean().item(),
    }


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return sample_images()


def test_strict_chains_equal_the_pil_reference(images: torch.Tensor) -> None:
    """Every op at every position of 135 chains, magnitudes no CPU rounds differently:
    identical to PIL, value for value."""
    magnitudes = {name: strict_magnitudes(name) for name in OP_NAMES}
    figures = measure(chains(magnitudes, seed=11), images)
    assert figures["chains"] == 135 and figures["max"] == 0, figures


def test_random_magnitude_chains_agree_within_a_level_on_average(images: torch.Tensor) -> None:
    """Magnitudes drawn per application (as the paper's single-transform policies): the mean
    below 0.1 level and at most 0.1% of values more than 3 levels off (both 0 on x86-64)."""
    figures = measure(chains(None, seed=12), images)
    assert figures["mean"] < 0.1 and figures["over_3"] <= 0.001, figures


def test_the_crop_is_rounded_before_the_policy(images: torch.Tensor) -> None:
    """With crop and flip on, the policy sees the crop rounded to whole levels, as it sees a
    PIL crop: the views equal the PIL chain applied to our rounded crop."""
    policy = Policy([[OpSetting("Brightness", 1.0, strict_magnitudes("Brightness")[1])],
                     [OpSetting("Equalize", 1.0)], [OpSetting("Posterize", 1.0, 0.7)]])  # fmt: skip
    views = BatchAugmenter(policy)(images, torch.Generator().manual_seed(5))
    generator = torch.Generator().manual_seed(5)
    cropped = random_resized_crop_flip(images.float(), generator).round().to(torch.uint8)
    plan = sample_plan(policy, len(images), generator)
    reference = torch.stack(
        [from_pil(apply_plan_pil(to_pil(image), plan, i)) for i, image in enumerate(cropped)]
    )
    assert torch.equal(views.mul(255).round().to(torch.uint8), reference)


if __name__ == "__main__":
    batch = sample_images()
    strict = {name: strict_magnitudes(name) for name in OP_NAMES}
    for label, magnitudes, seed in (("strict", strict, 11), ("random", None, 12)):
        print(label, measure(chains(magnitudes, seed), batch))
