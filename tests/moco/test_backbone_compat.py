"""The torch-only backbone is the backbone that subclassed torchvision's ResNet: same state_dict
keys and shapes, same outputs from the same weights, same initial weights from the same seed.
Checkpoints written by earlier versions therefore load and behave exactly as before."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet as tv_resnet

from selfaugment.trainer.config import ModelConfig
from selfaugment.trainer.moco.models import INPUT_MEAN, INPUT_STD, build_backbone

TV_BLOCKS = {
    "resnet18": (tv_resnet.BasicBlock, [2, 2, 2, 2]),
    "resnet50": (tv_resnet.Bottleneck, [3, 4, 6, 3]),
}


class TorchvisionReference(tv_resnet.ResNet):
    """The backbone as it was built before (torchvision's blocks and ``_make_layer``, stage
    widths [w, 2w, 4w, 8w], optional CIFAR stem, no classifier)."""

    def __init__(self, arch: str, width: int, in_channels: int, cifar_stem: bool) -> None:
        block, layers = TV_BLOCKS[arch]
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward_impl((x - INPUT_MEAN) / INPUT_STD)


CASES = [
    (arch, cifar_stem, channels)
    for arch in ("resnet18", "resnet50")
    for cifar_stem in (True, False)
    for channels in (1, 3)
]
WIDTH = 8
TOLERANCE = 1e-6


def _assert_close(actual: torch.Tensor, expected: torch.Tensor | None) -> None:
    assert expected is not None
    torch.testing.assert_close(actual, expected, rtol=TOLERANCE, atol=TOLERANCE)


def _pair(arch: str, cifar_stem: bool, channels: int, seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    reference = TorchvisionReference(arch, WIDTH, channels, cifar_stem)
    torch.manual_seed(seed)
    ours = build_backbone(ModelConfig(arch=arch, width=WIDTH, cifar_stem=cifar_stem), channels)
    return reference, ours


def _scramble(module: nn.Module, seed: int) -> None:
    """Random weights and BN statistics, so that eval mode exercises every parameter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                tensor.fill_(7)
            elif name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


@pytest.mark.parametrize(("arch", "cifar_stem", "channels"), CASES)
def test_state_dict_keys_and_shapes_match(arch: str, cifar_stem: bool, channels: int) -> None:
    reference, ours = _pair(arch, cifar_stem, channels)
    expected = {key: value.shape for key, value in reference.state_dict().items()}
    assert {key: value.shape for key, value in ours.state_dict().items()} == expected
    assert list(ours.state_dict()) == list(reference.state_dict())  # same order too


@pytest.mark.parametrize(("arch", "cifar_stem", "channels"), CASES)
def test_same_seed_gives_the_same_initial_weights(
    arch: str, cifar_stem: bool, channels: int
) -> None:
    reference, ours = _pair(arch, cifar_stem, channels, seed=3)
    for key, value in reference.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize(("arch", "cifar_stem", "channels"), CASES)
def test_reference_weights_give_the_same_outputs(
    arch: str, cifar_stem: bool, channels: int
) -> None:
    reference, ours = _pair(arch, cifar_stem, channels)
    _scramble(reference, seed=1)
    ours.load_state_dict(reference.state_dict(), strict=True)
    images = torch.rand(4, channels, 32, 32, generator=torch.Generator().manual_seed(2))

    reference.eval()
    ours.eval()
    with torch.no_grad():
        _assert_close(ours(images), reference(images))

    reference.train()
    ours.train()
    expected = reference(images)
    actual = ours(images)
    _assert_close(actual, expected)
    expected.square().sum().backward()
    actual.square().sum().backward()
    reference_params = dict(reference.named_parameters())
    for name, param in ours.named_parameters():
        assert param.grad is not None, name
        _assert_close(param.grad, reference_params[name].grad)
    reference_state = reference.state_dict()
    for key, value in ours.state_dict().items():  # running statistics updated alike
        _assert_close(value, reference_state[key])


def test_width_64_loads_torchvision_resnet50_weights() -> None:
    """At width 64 the backbone takes an ImageNet-layout torchvision ResNet-50's weights."""
    reference = tv_resnet.resnet50()
    _scramble(reference, seed=4)
    ours = build_backbone(ModelConfig(arch="resnet50", width=64, cifar_stem=False), 3)
    weights = {k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    ours.load_state_dict(weights, strict=True)
    reference.fc = nn.Identity()
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    reference.eval()
    ours.eval()
    with torch.no_grad():
        expected = reference((images - INPUT_MEAN) / INPUT_STD)
        _assert_close(ours(images), expected)
