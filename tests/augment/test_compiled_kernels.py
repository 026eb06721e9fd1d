"""The compiled CPU path (``augment/compiled.py``, numba) gives the eager path's views bit for
bit, on the same random draws: each op at several magnitudes, on 1- and 3-channel images of odd
sizes and batches of one, random chains, whole policies through ``BatchAugmenter`` in both crop
orders; and ``SELFAUGMENT_AUGMENT_KERNELS`` chooses the path.

Both paths run in the same test on the same generator seed (``_both``), so the comparison holds
on any CPU; the eager path is itself compared with the PIL reference elsewhere
(``test_ops.py``, ``tests/policy/test_agreement.py``).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from selfaugment.trainer.augment import compiled
from selfaugment.trainer.augment.ops import OP_NAMES, OPS
from selfaugment.trainer.policy import (
    AnyPolicy,
    BatchAugmenter,
    OpSetting,
    Policy,
    load_policy,
    resolve_policy,
)

ROOT = Path(__file__).resolve().parents[2]
VARIABLE = compiled.KERNELS_VARIABLE


def _images(batch: int, channels: int, height: int, width: int, seed: int) -> torch.Tensor:
    """Random uint8 images, every other one smooth (a ramp: few levels, flat regions), so that
    Equalize, AutoContrast and the blends meet both kinds of histogram."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, channels, height, width), generator=generator)
    ramp = torch.arange(height).view(-1, 1) * 7 + torch.arange(width).view(1, -1) * 3
    images[1::2] = (ramp % 200 + 20).expand(channels, -1, -1)
    return images.to(torch.uint8)


def _both(
    monkeypatch: pytest.MonkeyPatch, augmenter: BatchAugmenter, images: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager and the compiled views of ``images`` from generators seeded alike."""
    before = images.clone()
    monkeypatch.setenv(VARIABLE, "torch")
    eager = augmenter(images, torch.Generator().manual_seed(seed))
    monkeypatch.setenv(VARIABLE, "numba")
    fast = augmenter(images, torch.Generator().manual_seed(seed))
    assert torch.equal(images, before), "the caller's batch was modified"
    return eager, fast


def _assert_same(eager: torch.Tensor, fast: torch.Tensor, what: str) -> None:
    assert fast.dtype == eager.dtype == torch.float32 and fast.shape == eager.shape, what
    differing = (eager != fast).sum().item()
    if differing:
        worst = (eager - fast).abs().max().item() * 255.0
        raise AssertionError(f"{what}: {differing} values differ, up to {worst:.4f} levels")


SHAPES = [(3, 32, 32), (1, 32, 32), (3, 17, 23), (1, 23, 17), (3, 2, 5)]
MAGNITUDES = (0.0, 0.1, 0.45, 0.8, 1.0)


@pytest.mark.parametrize("name", OP_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_each_op_equals_the_eager_path(
    monkeypatch: pytest.MonkeyPatch, name: str, shape: tuple[int, int, int]
) -> None:
    """Each op alone (no crop, no flip) at several fixed magnitudes and at random ones, both
    directions (the sign is drawn per sample), on 12 images."""
    images = _images(12, shape[0], shape[1], shape[2], seed=len(name))
    settings = [OpSetting(name, 1.0, magnitude) for magnitude in MAGNITUDES]
    settings.append(OpSetting(name, 1.0, None))
    for index, setting in enumerate(settings):
        augmenter = BatchAugmenter(Policy([[setting]]), crop=False, flip=False)
        eager, fast = _both(monkeypatch, augmenter, images, seed=index)
        _assert_same(eager, fast, f"{setting} on {shape}")


@pytest.mark.parametrize("name", OP_NAMES)
def test_each_op_on_a_batch_of_one_after_the_crop(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    images = _images(1, 3, 17, 23, seed=3)
    augmenter = BatchAugmenter(Policy([[OpSetting(name, 1.0, None)]]))
    for seed in range(4):
        _assert_same(*_both(monkeypatch, augmenter, images, seed), f"{name}, seed {seed}")


def _random_chain(rng: random.Random) -> Policy:
    """One sub-policy of 2-4 ops, magnitudes fixed or random, directions fixed or random."""
    chain = []
    for _ in range(rng.randint(2, 4)):
        name = rng.choice(OP_NAMES)
        magnitude = rng.choice([None, rng.random()])
        direction = rng.choice([None, -1, 1]) if OPS[name].signed else None
        chain.append(OpSetting(name, rng.choice([1.0, 0.7]), magnitude, direction))
    return Policy([chain])


def test_random_chains_equal_the_eager_path(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(11)
    images = _images(16, 3, 32, 32, seed=5)
    for index in range(40):
        policy = _random_chain(rng)
        augmenter = BatchAugmenter(policy, crop=index % 2 == 0, policy_first=index % 4 == 1)
        _assert_same(*_both(monkeypatch, augmenter, images, index), repr(policy))


def _random_policy(seed: int) -> Policy:
    rng = random.Random(seed)
    return Policy(
        [[OpSetting(rng.choice(OP_NAMES), rng.random(), rng.random()) for _ in range(2)]
         for _ in range(5)]
    )  # fmt: skip


POLICIES = {
    "mocov2": lambda: load_policy(ROOT / "examples" / "mocov2-policy.json"),
    "random-5x2-a": lambda: _random_policy(1),
    "random-5x2-b": lambda: _random_policy(2),
    "randaugment": lambda: resolve_policy("randaugment:3:18"),
    "none": lambda: resolve_policy("none"),
}


@pytest.mark.parametrize("name", POLICIES)
@pytest.mark.parametrize("policy_first", [False, True])
@pytest.mark.parametrize("crop, flip", [(True, True), (True, False), (False, True), (False, False)])
def test_policies_through_the_augmenter_equal_the_eager_path(
    monkeypatch: pytest.MonkeyPatch, name: str, policy_first: bool, crop: bool, flip: bool
) -> None:
    policy: AnyPolicy = POLICIES[name]()
    augmenter = BatchAugmenter(policy, crop=crop, flip=flip, policy_first=policy_first)
    for seed, shape in enumerate([(3, 32, 32), (1, 17, 23)]):
        images = _images(24, *shape, seed=seed)
        _assert_same(*_both(monkeypatch, augmenter, images, seed), f"{name} on {shape}")


def test_a_non_contiguous_batch_and_a_strong_crop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A channels-last view (the kernels read a contiguous copy) and crops down to 1% of the
    area and extreme aspect ratios (boxes of a few pixels, weights far from 1/2)."""
    images = _images(16, 3, 24, 24, seed=9).permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    assert not images.is_contiguous()
    augmenter = BatchAugmenter(
        load_policy(ROOT / "examples" / "mocov2-policy.json"),
        crop_scale=(0.01, 1.0),
        crop_ratio=(0.2, 5.0),
    )
    for seed in range(3):
        _assert_same(*_both(monkeypatch, augmenter, images, seed), f"seed {seed}")


def test_the_augmenter_takes_the_compiled_path_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset (auto): CPU uint8 batches go through ``compiled.augment``; float batches and
    ``torch`` never do."""
    calls: list[int] = []
    original = compiled.augment

    def counting(*arguments: Any, **keywords: Any) -> torch.Tensor:
        calls.append(1)
        return original(*arguments, **keywords)

    monkeypatch.setattr(compiled, "augment", counting)
    augmenter = BatchAugmenter("mocov2")
    images = _images(4, 3, 16, 16, seed=0)
    monkeypatch.delenv(VARIABLE, raising=False)
    augmenter(images)
    assert len(calls) == 1
    augmenter(images.float() / 255.0)  # float: eager
    monkeypatch.setenv(VARIABLE, "torch")
    augmenter(images)
    monkeypatch.setenv(VARIABLE, "AUTO")  # case and spaces do not matter
    augmenter(images)
    assert len(calls) == 2


def test_an_invalid_choice_is_an_error_naming_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, "cuda")
    with pytest.raises(ValueError, match=f"{VARIABLE}='cuda'.*auto, torch, numba"):
        BatchAugmenter("mocov2")(_images(2, 3, 8, 8, seed=0))


def test_numba_required_but_missing_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compiled, "_kernels", lambda: None)
    monkeypatch.setenv(VARIABLE, "numba")
    with pytest.raises(RuntimeError, match=f"{VARIABLE}=numba"):
        BatchAugmenter("mocov2")(_images(2, 3, 8, 8, seed=0))
    monkeypatch.setenv(VARIABLE, "auto")  # auto falls back to the eager path
    assert BatchAugmenter("mocov2")(_images(2, 3, 8, 8, seed=0)).shape == (2, 3, 8, 8)


def test_the_kernel_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """NUMBA_CACHE_DIR when set, else $SELFAUGMENT_CACHE/numba: never beside the source."""
    monkeypatch.setenv("NUMBA_CACHE_DIR", str(tmp_path / "numba-here"))
    assert compiled.cache_folder() == tmp_path / "numba-here"
    monkeypatch.delenv("NUMBA_CACHE_DIR")
    monkeypatch.setenv("SELFAUGMENT_CACHE", str(tmp_path / "cache"))
    assert compiled.cache_folder() == tmp_path / "cache" / "numba"


def test_the_crop_arithmetic_is_measured_and_the_probe_tells_the_two_apart() -> None:
    """This torch's crop is reproduced by one of the two roundings, and the probe that picks
    it would notice the other (else it could pick the wrong one)."""
    fused = compiled.crop_arithmetic()
    assert fused is not None
    eager, chosen = compiled._probe_crop(fused)
    assert torch.equal(eager, chosen)
    eager, other = compiled._probe_crop(not fused)
    assert (eager != other).sum().item() > 50


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (3, 3, 1, 5), (3, 1, 5, 1), (2, 3, 1, 1)])
def test_degenerate_shapes_equal_the_eager_path(
    monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int, int, int]
) -> None:
    """Empty batches, single rows and columns, single pixels: no filter interior, a crop axis
    of one pixel."""
    images = torch.randint(0, 256, shape, generator=torch.Generator().manual_seed(1))
    for name in ("mocov2", "randaugment:2:20", "none"):
        for policy_first in (False, True):
            augmenter = BatchAugmenter(name, policy_first=policy_first)
            eager, fast = _both(monkeypatch, augmenter, images.to(torch.uint8), seed=2)
            _assert_same(eager, fast, f"{name} on {shape}")


def test_the_affine_memo_when_it_fills_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Random magnitudes give a new argument per sample: the memo of affine data empties when
    full and the views stay the eager path's."""
    monkeypatch.setattr(compiled, "_AFFINE_MEMO_ENTRIES", 10)
    monkeypatch.setattr(compiled, "_AFFINE_MEMO", {})
    policy = Policy(
        [[OpSetting("Rotate", 1.0), OpSetting("ShearX", 0.5), OpSetting("TranslateY", 0.5)]]
    )
    augmenter = BatchAugmenter(policy)
    images = _images(8, 3, 12, 12, seed=4)
    for seed in range(3):
        _assert_same(*_both(monkeypatch, augmenter, images, seed), f"batch {seed}")
    assert len(compiled._AFFINE_MEMO) <= 10 + 8 * 3
