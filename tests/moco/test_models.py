"""Backbones: shapes, widths, stems and the built-in input normalisation."""

import pytest
import torch
import torchvision

from selfaugment.trainer.config import ModelConfig
from selfaugment.trainer.moco.models import INPUT_MEAN, INPUT_STD, build_backbone


def _count(module: torch.nn.Module) -> int:
    return sum(param.numel() for param in module.parameters())


@pytest.mark.parametrize("channels", [1, 3])
def test_tiny_resnet18_gives_features(channels: int) -> None:
    backbone = build_backbone(ModelConfig(arch="resnet18", width=8, cifar_stem=True), channels)
    features = backbone(torch.rand(5, channels, 16, 16))
    assert features.shape == (5, 64)
    assert backbone.feature_dim == 64
    assert isinstance(backbone.maxpool, torch.nn.Identity)
    assert backbone.conv1.kernel_size == (3, 3) and backbone.conv1.stride == (1, 1)


def test_width_64_matches_torchvision_resnet18_and_resnet50() -> None:
    for arch, reference in [
        ("resnet18", torchvision.models.resnet18()),
        ("resnet50", torchvision.models.resnet50()),
    ]:
        backbone = build_backbone(ModelConfig(arch=arch, width=64, cifar_stem=False), 3)
        expected = _count(reference) - _count(reference.fc)
        assert _count(backbone) == expected, arch
        shapes = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc")}
        assert {k: v.shape for k, v in backbone.state_dict().items()} == shapes


def test_resnet50_width_scales_stages() -> None:
    backbone = build_backbone(ModelConfig(arch="resnet50", width=8, cifar_stem=False), 3)
    assert backbone.feature_dim == 8 * 8 * 4
    assert backbone(torch.rand(2, 3, 32, 32)).shape == (2, 256)
    assert backbone.layer3[0].conv1.in_channels == 2 * 8 * 4


def test_input_is_normalised_inside_the_module() -> None:
    backbone = build_backbone(ModelConfig(width=8), 3).eval()
    seen: list[torch.Tensor] = []
    backbone.conv1.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    images = torch.rand(2, 3, 16, 16)
    backbone(images)
    torch.testing.assert_close(seen[0], (images - INPUT_MEAN) / INPUT_STD)
    assert seen[0].min() >= -2.0 and seen[0].max() <= 2.0


def test_wrong_channel_count_is_a_clear_error() -> None:
    backbone = build_backbone(ModelConfig(width=8), 1)
    with pytest.raises(ValueError, match=r"\[B, 1, H, W\]"):
        backbone(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone(ModelConfig(width=8), 2)
