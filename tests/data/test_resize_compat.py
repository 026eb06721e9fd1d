"""The torch-only resize and centre crop give torchvision's pixels, so data prepared before they
replaced torchvision's functional API (and any cache built from it) stays the same."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as tvf

from selfaugment.trainer.data.codec import encode_array
from selfaugment.trainer.data.convert import (
    center_crop,
    resize_and_crop,
    resize_shorter_side,
    resized_size,
)

# (height, width, target shorter side): down and up, square and not, odd and even margins.
SHAPES = [
    (32, 32, 16),
    (32, 32, 48),
    (28, 28, 32),
    (37, 53, 20),
    (53, 37, 20),
    (17, 90, 32),
    (90, 17, 8),
    (64, 33, 33),
    (5, 7, 3),
    (3, 5, 11),
    (101, 67, 64),
]


def _images(leading: tuple[int, ...], channels: int, height: int, width: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(height * 1000 + width + channels)
    return torch.randint(0, 256, (*leading, channels, height, width), generator=generator).to(
        torch.uint8
    )


def _torchvision_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return tvf.resize(images, [size], interpolation=tvf.InterpolationMode.BILINEAR, antialias=True)


@pytest.mark.parametrize(("height", "width", "size"), SHAPES)
@pytest.mark.parametrize("channels", [1, 3])
def test_resize_equals_torchvision(height: int, width: int, size: int, channels: int) -> None:
    for leading in [(4,), (), (2, 2)]:
        images = _images(leading, channels, height, width)
        expected = _torchvision_resize(images, size)
        actual = resize_shorter_side(images, size)
        assert actual.dtype == torch.uint8
        assert actual.shape == expected.shape
        assert torch.equal(actual, expected), (leading, channels, height, width, size)
        assert resized_size(height, width, size) == tuple(expected.shape[-2:])


@pytest.mark.parametrize(("height", "width", "size"), SHAPES)
def test_resize_equals_torchvision_for_channels_last_images(
    height: int, width: int, size: int
) -> None:
    """A decoded HWC array seen as CHW (the path of a large image file being stored)."""
    hwc = _images((), height, width, 3).reshape(height, width, 3)
    image = hwc.permute(2, 0, 1)
    assert torch.equal(resize_shorter_side(image, size), _torchvision_resize(image, size))


@pytest.mark.parametrize("capability", ["AVX2", "DEFAULT"])
def test_both_interpolation_routes_equal_torchvision(
    monkeypatch: pytest.MonkeyPatch, capability: str
) -> None:
    """The native uint8 kernel and the float32 route differ by a grey level in some pixels; each
    CPU takes the same route as torchvision (both read the capability at call time)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    for height, width, size in SHAPES:
        images = _images((3,), 3, height, width)
        assert torch.equal(resize_shorter_side(images, size), _torchvision_resize(images, size))


def test_the_two_routes_differ_so_the_route_test_means_something() -> None:
    images = _images((4,), 3, 37, 53)
    native = torch.nn.functional.interpolate(
        images, size=[20, 28], mode="bilinear", align_corners=False, antialias=True
    )
    via_float = torch.nn.functional.interpolate(
        images.float(), size=[20, 28], mode="bilinear", align_corners=False, antialias=True
    )
    assert not torch.equal(native, via_float.round().to(torch.uint8))


@pytest.mark.parametrize(
    ("height", "width", "crop_height", "crop_width"),
    [
        (32, 32, 16, 16),
        (37, 53, 20, 20),
        (20, 25, 20, 20),
        (21, 30, 18, 27),
        (7, 7, 10, 12),
        (10, 5, 8, 8),
        (9, 16, 9, 9),
        (4, 4, 4, 4),
    ],
)
def test_center_crop_equals_torchvision(
    height: int, width: int, crop_height: int, crop_width: int
) -> None:
    images = _images((2,), 3, height, width)
    expected = tvf.center_crop(images, [crop_height, crop_width])
    assert torch.equal(center_crop(images, crop_height, crop_width), expected)


@pytest.mark.parametrize(("height", "width", "size"), SHAPES)
def test_resize_and_crop_equals_torchvision(height: int, width: int, size: int) -> None:
    images = _images((3,), 1, height, width)
    expected = tvf.center_crop(_torchvision_resize(images, size), [size, size])
    assert torch.equal(resize_and_crop(images, size), expected)


def test_stored_arrays_are_downscaled_as_torchvision_does() -> None:
    sample = _images((), 3, 90, 61)
    stored = encode_array(sample.numpy(), 40)
    assert stored.downscaled
    array = np.load(io.BytesIO(stored.data), allow_pickle=False)
    assert np.array_equal(array, _torchvision_resize(sample, 40).numpy())


def test_resize_refuses_non_uint8() -> None:
    with pytest.raises(ValueError, match="uint8"):
        resize_shorter_side(torch.zeros(1, 3, 8, 8), 4)
