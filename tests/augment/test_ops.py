"""The 15 ops: batched tensor ops against the per-image PIL reference, and their contracts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from selfaugment.trainer.augment import geometric as augment_geometric
from selfaugment.trainer.augment import pil
from selfaugment.trainer.augment import tensor as augment_tensor
from selfaugment.trainer.augment.crop import (
    random_resized_crop_flip,
    resized_crop_flip,
    sample_crop_boxes,
)
from selfaugment.trainer.augment.ops import CROP_RATIO, OP_NAMES, OPS, get_op

SIZE = 24
MAGNITUDES = (0.0, 0.3, 0.7, 1.0)
SIGNS = (1.0, -1.0)
GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
BLENDS = ("Contrast", "Color", "Brightness", "Sharpness")

# Allowed disagreement with PIL, per op: (fraction of values that may differ, max abs diff).
# Blend ops (PIL ImagingBlend): the same float32 formula, truncated; exact on x86-64, +-1
# allowed on a few values where PIL's compiler fuses the multiply-add (e.g. aarch64).
# Geometric ops use PIL's own fixed-point and double arithmetic, all other ops are integer
# look-up tables or masks: exact.
TOLERANCE: dict[str, tuple[float, int]] = {name: (0.0, 0) for name in OP_NAMES}
TOLERANCE.update({name: (0.01, 1) for name in BLENDS})


def _test_images() -> torch.Tensor:
    """Digits upscaled and tinted (real-looking), random RGB, and smooth gradients: [14,3,S,S]."""
    digits = load_digits().images[:8] / 16.0  # 8x8 in [0, 1]
    upscaled = np.kron(digits, np.ones((SIZE // 8, SIZE // 8)))
    tinted = np.stack([upscaled * 230 + 10, upscaled * 150 + 60, 200 - upscaled * 180], axis=1)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (4, 3, SIZE, SIZE))
    ys, xs = np.mgrid[0:SIZE, 0:SIZE] * (255 / (SIZE - 1))
    gradient = np.stack([xs, ys, (xs + ys) / 2])[None].repeat(2, axis=0)
    batch = np.concatenate([tinted, noise, gradient]).round().clip(0, 255)
    return torch.from_numpy(batch.astype(np.uint8))


IMAGES = _test_images()


def to_pil(image: torch.Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)


def from_pil(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image)
    return torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)


def _centers(count: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(count, 2, generator=generator) * SIZE


def run_tensor(name: str, images: torch.Tensor, arguments: torch.Tensor) -> torch.Tensor:
    if name == "Cutout":  # explicit centres so that PIL and tensor cut the same square
        return augment_geometric.cutout(images, arguments, centers=_centers(len(images)))
    return OPS[name].tensor(images, arguments, None)


def run_pil(name: str, images: torch.Tensor, argument: float) -> torch.Tensor:
    outputs = []
    for image, center in zip(images, _centers(len(images)), strict=True):
        if name == "Cutout":
            result = OPS[name].pil(to_pil(image), argument, None, center=tuple(center.tolist()))  # type: ignore[call-arg]
        else:
            result = OPS[name].pil(to_pil(image), argument, None)
        outputs.append(from_pil(result))
    return torch.stack(outputs)


def test_table_holds_the_fifteen_paper_ops() -> None:
    assert set(OP_NAMES) == {
        "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "AutoContrast", "Equalize",
        "Invert", "Solarize", "Posterize", "Contrast", "Color", "Brightness", "Sharpness",
        "Cutout",
    }  # fmt: skip
    with pytest.raises(KeyError, match="unknown op 'Rotation'.*valid ops: ShearX"):
        get_op("Rotation")


@pytest.mark.parametrize("name", OP_NAMES)
def test_argument_is_monotone_in_magnitude(name: str) -> None:
    spec = OPS[name]
    assert spec.argument(0.0, -1.0) == spec.identity_argument
    assert spec.argument(1.0, 1.0) == pytest.approx(spec.max_argument)
    if spec.has_magnitude:
        distances = [
            abs(spec.argument(m, s) - spec.identity_argument) for s in SIGNS for m in MAGNITUDES
        ]
        for sign_block in (distances[:4], distances[4:]):
            assert sign_block == sorted(sign_block) and sign_block[-1] > 0
    if spec.signed:  # the sign reflects the argument around the identity
        assert spec.argument(0.5, -1.0) - spec.identity_argument == pytest.approx(
            spec.identity_argument - spec.argument(0.5, 1.0)
        )


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("magnitude", MAGNITUDES)
@pytest.mark.parametrize("name", OP_NAMES)
def test_batched_matches_pil_reference(name: str, magnitude: float, sign: float) -> None:
    spec = OPS[name]
    argument = torch.tensor(spec.argument(magnitude, sign), dtype=torch.float32)
    batched = run_tensor(name, IMAGES, argument.expand(len(IMAGES)))
    reference = run_pil(name, IMAGES, float(argument))
    assert batched.dtype == torch.uint8 and batched.shape == IMAGES.shape
    difference = (batched.int() - reference.int()).abs()
    max_fraction, max_abs = TOLERANCE[name]
    assert (difference > 0).float().mean().item() <= max_fraction
    assert difference.max().item() <= max_abs


def test_geometric_memo_gives_pils_pixels_when_computed_looked_up_and_emptied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Source indices are memoised per map; a memo that fills up is emptied, never stale."""
    monkeypatch.setattr(augment_geometric, "_INDEX_CACHE", {})
    monkeypatch.setattr(augment_geometric, "_INDEX_CACHE_ENTRIES", 5)
    angles = torch.tensor([-20.0, 7.5, 13.0, -20.0, 29.0, 7.5] * 2 + [1.0, 2.0])
    images = IMAGES[: len(angles) // 2].repeat(2, 1, 1, 1)
    for _ in range(2):  # computed (and the memo emptied on the way), then partly looked up
        batched = augment_geometric.rotate(images, angles)
        for image, angle, result in zip(images, angles.tolist(), batched, strict=True):
            assert torch.equal(result, from_pil(pil.rotate(to_pil(image), angle)))
    assert 0 < len(augment_geometric._INDEX_CACHE) <= 5


def test_ops_match_pil_on_grayscale_images() -> None:
    gray = IMAGES[:, :1].contiguous()
    for name in OP_NAMES:
        argument = torch.tensor(OPS[name].argument(0.7, -1.0), dtype=torch.float32)
        difference = (run_tensor(name, gray, argument.expand(len(gray))).int()
                      - run_pil(name, gray, float(argument)).int()).abs()  # fmt: skip
        max_fraction, max_abs = TOLERANCE[name]
        assert (difference > 0).float().mean().item() <= max_fraction, name
        assert difference.max().item() <= max_abs, name


@pytest.mark.parametrize("name", [n for n in OP_NAMES if OPS[n].has_magnitude])
def test_magnitude_zero_is_identity(name: str) -> None:
    identity = torch.full((len(IMAGES),), OPS[name].argument(0.0, 1.0))
    assert torch.equal(run_tensor(name, IMAGES, identity), IMAGES)
    floats = IMAGES.float() / 255
    assert torch.equal(run_tensor(name, floats, identity), floats)


@pytest.mark.parametrize("sign", SIGNS)
@pytest.mark.parametrize("name", [n for n in OP_NAMES if OPS[n].has_magnitude])
def test_strength_grows_with_magnitude(name: str, sign: float) -> None:
    images = IMAGES
    if name == "Cutout":  # the area cut out, on black images
        images = torch.zeros_like(IMAGES)
    elif name in GEOMETRIC:  # a displacement changes a smooth ramp in proportion
        images = IMAGES[-2:]
    changes = []
    for magnitude in (0.25, 0.5, 0.75, 1.0):
        arguments = torch.full((len(images),), OPS[name].argument(magnitude, sign))
        output = run_tensor(name, images, arguments)
        changes.append((output.float() - images.float()).abs().mean().item())
    assert changes == sorted(changes), changes
    assert changes[0] > 0 and changes[-1] > changes[0]


@pytest.mark.parametrize("name", OP_NAMES)
def test_uint8_and_float_inputs_agree(name: str) -> None:
    # Floats are read as 8-bit levels and rounded as PIL rounds: the uint8 result / 255.
    max_levels = 1e-3
    for sign in SIGNS:
        arguments = torch.full((len(IMAGES),), OPS[name].argument(0.7, sign))
        from_uint8 = run_tensor(name, IMAGES, arguments).float()
        from_float = run_tensor(name, IMAGES.float() / 255, arguments)
        assert from_float.dtype == torch.float32
        assert (from_float * 255 - from_uint8).abs().max().item() <= max_levels
        as_double = run_tensor(name, IMAGES.double() / 255, arguments)
        assert as_double.dtype == torch.float64


@pytest.mark.parametrize("name", [n for n in OP_NAMES if OPS[n].has_magnitude])
def test_arguments_are_per_sample(name: str) -> None:
    image = IMAGES[8:9]  # random RGB: every op changes it
    magnitudes = torch.tensor([0.2, 0.45, 0.7, 1.0])  # Posterize: 7, 6, 5 and 4 bits
    arguments = OPS[name].argument(magnitudes, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    batched = run_tensor(name, image.repeat(4, 1, 1, 1), arguments)
    for index in range(4):
        single = run_tensor(name, image, arguments[index : index + 1])
        if name == "Cutout":  # centres are per batch position: compare with the same centre
            center = _centers(4)[index : index + 1]
            single = augment_geometric.cutout(image, arguments[index : index + 1], centers=center)
        assert torch.equal(batched[index], single[0]), index
    assert len({bytes(output.numpy()) for output in batched}) == 4


def test_fused_blend_equals_each_enhance_op() -> None:
    factors = torch.linspace(0.1, 1.9, len(IMAGES))
    for images in (IMAGES, IMAGES.float() / 255):
        for name in ("Brightness", "Color", "Contrast"):
            gray_weight, mean_weight = OPS[name].blend or (None, None)
            fused = augment_tensor.blend_with_gray(images, factors, gray_weight, mean_weight)
            assert torch.equal(fused, OPS[name].tensor(images, factors, None)), name


def test_cutout_draws_centres_from_the_generator() -> None:
    first = augment_geometric.cutout(IMAGES, 0.2, torch.Generator().manual_seed(3))
    again = augment_geometric.cutout(IMAGES, 0.2, torch.Generator().manual_seed(3))
    other = augment_geometric.cutout(IMAGES, 0.2, torch.Generator().manual_seed(4))
    assert torch.equal(first, again) and not torch.equal(first, other)
    side = math.floor(0.2 * SIZE) + 1
    assert ((first == 128).all(dim=1).sum(dim=(1, 2)) >= side * side // 4).all()


@pytest.mark.parametrize(
    ("fraction", "center", "box"),
    [
        (0.0, (12.0, 12.0), (12, 12, 12, 12)),  # level 0: nothing (FAA returns the image)
        (0.01, (12.0, 12.0), (11, 11, 12, 12)),  # v = 0.24 px: FAA still draws one pixel
        (0.2, (12.0, 12.0), (9, 9, 14, 14)),  # v = 4.8: corner int(12 - 2.4), side 4 + 1
        (0.2, (1.0, 23.5), (0, 21, 5, 24)),  # clipped at the left and at the bottom
    ],
)
def test_cutout_box_is_fast_autoaugments(
    fraction: float, center: tuple[float, float], box: tuple[int, int, int, int]
) -> None:
    """FAA: corner = int(max(0, c - v/2)), PIL rectangle to corner + v, both ends included."""
    assert pil.cutout_box(center, fraction, SIZE, SIZE) == box
    batched = augment_geometric.cutout_boxes(
        torch.tensor([fraction]), torch.tensor([center]), SIZE, SIZE
    )
    assert tuple(int(v) for v in batched[0]) == box
    image = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8)
    filled = augment_geometric.cutout(image, fraction, centers=torch.tensor([center]))
    rows, columns = torch.nonzero(filled[0, 0] == 128, as_tuple=True)
    if box[2] > box[0]:
        assert (columns.min(), columns.max() + 1, rows.min(), rows.max() + 1) == (
            box[0], box[2], box[1], box[3],
        )  # fmt: skip
    else:
        assert rows.numel() == 0


def test_posterize_truncates_bits_like_fast_autoaugment() -> None:
    """FAA keeps int(4 + 4 * level) bits: every magnitude above 0 removes at least one bit."""
    spec = OPS["Posterize"]
    kept = [pil.posterize_bits(spec.argument(m)) for m in (0.0, 0.01, 0.25, 0.26, 0.99, 1.0)]
    assert kept == [8, 7, 7, 6, 4, 4]
    value = torch.full((1, 1, 1, 1), 255, dtype=torch.uint8)
    assert augment_tensor.posterize(value, spec.argument(0.01)).item() == 254


def test_invalid_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"images: expected a \[B, C, H, W\] batch"):
        augment_tensor.brightness(IMAGES[0], 1.5)
    with pytest.raises(TypeError, match="uint8 or floating point"):
        augment_tensor.brightness(IMAGES.int(), 1.5)
    with pytest.raises(ValueError, match=r"one value per image \(14\)"):
        augment_tensor.brightness(IMAGES, torch.ones(3))


def test_crop_of_the_whole_image_is_identity_and_flip_mirrors() -> None:
    images = IMAGES.float() / 255
    whole = torch.tensor([[0.0, 0.0, SIZE, SIZE]]).repeat(len(images), 1)
    no_flip = torch.zeros(len(images), dtype=torch.bool)
    assert torch.allclose(resized_crop_flip(images, whole, no_flip), images, atol=1e-5)
    mirrored = resized_crop_flip(images, whole, torch.ones(len(images), dtype=torch.bool))
    assert torch.allclose(mirrored, images.flip(-1), atol=1e-5)


def test_crop_boxes_follow_scale_and_ratio() -> None:
    boxes = sample_crop_boxes(4000, 32, 32, (0.2, 1.0), generator=torch.Generator().manual_seed(0))
    top, left, height, width = boxes.unbind(dim=1)
    assert ((top >= 0) & (left >= 0) & (top + height <= 32) & (left + width <= 32)).all()
    area = height * width / (32 * 32)
    assert area.min() >= 0.15 and area.max() <= 1.0  # 0.2 up to rounding of the sides
    ratio = width / height
    assert ratio.min() >= CROP_RATIO[0] * 0.8 and ratio.max() <= CROP_RATIO[1] * 1.25
    assert area.std() > 0.15  # really random: uniform on [0.2, 1] has std 0.23


def test_random_crop_flip_is_seeded_and_keeps_shape() -> None:
    images = IMAGES.float() / 255
    first = random_resized_crop_flip(images, torch.Generator().manual_seed(0))
    again = random_resized_crop_flip(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and torch.equal(first, again)
    assert not torch.allclose(first, images)
