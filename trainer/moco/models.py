"""Backbones: ResNets (He et al. 2016) with a width option, a CIFAR stem and input scaling.

The backbone takes float images in [0, 1] of shape [B, C, H, W] and returns pooled features
[B, D] (no classifier). Input normalisation lives inside the module so that every caller
(training, probes, policy scoring) feeds the same [0, 1] images: each channel is mapped by
``(x - 0.5) / 0.25``, a fixed, dataset-independent normalisation (no statistics to compute or
store, and the same for 1- and 3-channel data), which puts [0, 1] pixels in [-2, 2].

The blocks are written here on ``torch.nn`` rather than taken from torchvision: importing
torchvision imports ``torch._dynamo`` (about 1.5 s on a 2-core machine), a cost every short
worker process of a search paid. Module names, shapes, registration order and initialisation
follow torchvision's ResNet (v1.5: a bottleneck's stride is on its 3x3 convolution), so
checkpoints written when the backbone subclassed torchvision's ResNet load unchanged, give the
same outputs, and a seed gives the same initial weights
(``tests/moco/test_backbone_compat.py`` checks all three against torchvision).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from selfaugment.trainer.config import ModelConfig

INPUT_MEAN = 0.5
INPUT_STD = 0.25


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut: the residual unit of ResNet-18/34."""

    expansion = 1

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Named "downsample" as in torchvision: the key prefix of the projection's weights.
        self.downsample = shortcut
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, v1.5), 1x1 expand by 4, and a shortcut: the residual
    unit of ResNet-50 and deeper."""

    expansion = 4

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.conv1 = _conv1x1(in_planes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


Block = type[BasicBlock] | type[Bottleneck]

# Blocks per stage, as in He et al. 2016 (Table 1).
_ARCHS: dict[str, tuple[Block, list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


def _stage(block: Block, in_planes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    """`blocks` residual units at `planes` inner channels; the first takes the stride and, where
    its input and output differ in shape, a 1x1 projection shortcut followed by batch norm.

    Each block registers the projection last, as torchvision does: the initialisation in
    ``ResNetBackbone`` draws weights in registration order, so a seed gives the same weights."""
    out_planes = planes * block.expansion
    shortcut: nn.Module | None = None
    if stride != 1 or in_planes != out_planes:
        shortcut = nn.Sequential(
            _conv1x1(in_planes, out_planes, stride), nn.BatchNorm2d(out_planes)
        )
    units: list[nn.Module] = [block(in_planes, planes, stride, shortcut)]
    units.extend(block(out_planes, planes) for _ in range(1, blocks))
    return nn.Sequential(*units)


class ResNetBackbone(nn.Module):
    """ResNet with stage widths [w, 2w, 4w, 8w] and no classifier; ``width=64`` gives exactly
    torchvision's layer shapes (torchvision fixes the first stage at 64 channels)."""

    def __init__(
        self,
        block: Block,
        layers: list[int],
        *,
        width: int,
        in_channels: int,
        cifar_stem: bool,
    ) -> None:
        super().__init__()
        if cifar_stem:
            self.conv1 = nn.Conv2d(
                in_channels, width, kernel_size=3, stride=1, padding=1, bias=False
            )
        else:
            self.conv1 = nn.Conv2d(
                in_channels, width, kernel_size=7, stride=2, padding=3, bias=False
            )
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = (
            nn.Identity() if cifar_stem else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        )
        expansion = block.expansion
        self.layer1 = _stage(block, width, width, layers[0], stride=1)
        self.layer2 = _stage(block, width * expansion, 2 * width, layers[1], stride=2)
        self.layer3 = _stage(block, 2 * width * expansion, 4 * width, layers[2], stride=2)
        self.layer4 = _stage(block, 4 * width * expansion, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feature_dim = 8 * width * expansion
        self.in_channels = in_channels
        self.width = width
        self.cifar_stem = cifar_stem
        self.expansion = expansion
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] floats in [0, 1] -> [B, feature_dim]."""
        if images.dim() != 4 or images.shape[1] != self.in_channels:
            raise ValueError(
                f"backbone expects images [B, {self.in_channels}, H, W], got {tuple(images.shape)}"
            )
        x = (images - INPUT_MEAN) / INPUT_STD
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)  # B x D

    def largest_activation_bytes(self, height: int, width: int) -> int:
        """Bytes (float32) of the largest activation one image makes: the stem's output or the
        first stage's, whichever is larger; what decides whether a chunk stays in cache."""
        stride = 1 if self.cifar_stem else 2  # of the stem's convolution, and of its pooling
        stem = self.width * math.ceil(height / stride) * math.ceil(width / stride)
        stage = (
            self.width
            * self.expansion
            * math.ceil(height / stride / stride)
            * math.ceil(width / stride / stride)
        )
        return 4 * max(stem, stage)


CPU_CHUNK_BYTES = 4 * 2**20
"""Largest activation of one inference chunk on the CPU. Measured on a 2-core x86 machine
(ResNet-18, 16-64 px, widths 8-64): a forward pass in chunks whose activations stay near the
core's cache ran 1.5-5.7x faster than one batch of 1,024 images and never slower than 256
(``benchmarks/bench_scoring.py`` compares the scorer with and without chunks)."""
MIN_CPU_CHUNK = 8


def inference_chunk(
    backbone: nn.Module, image_size: tuple[int, int], device: torch.device, limit: int
) -> int:
    """Images per forward pass when ``backbone`` infers on ``device`` (eval mode, no grad).

    On the CPU: as many as keep the largest activation within CPU_CHUNK_BYTES (at least
    MIN_CPU_CHUNK, at most ``limit``); on accelerators ``limit``, where large batches pay.
    In eval mode every image's output is independent of the others, so chunking changes no
    result beyond floating-point rounding."""
    sizer = getattr(backbone, "largest_activation_bytes", None)
    if device.type != "cpu" or sizer is None:
        return limit
    per_image = max(1, int(sizer(*image_size)))
    return max(1, min(limit, max(MIN_CPU_CHUNK, CPU_CHUNK_BYTES // per_image)))


def forward_in_chunks(module: nn.Module, inputs: torch.Tensor, chunk: int) -> torch.Tensor:
    """``module(inputs)`` computed ``chunk`` rows at a time (for inference only)."""
    if inputs.shape[0] <= chunk:
        return module(inputs)
    return torch.cat(
        [module(inputs[start : start + chunk]) for start in range(0, inputs.shape[0], chunk)]
    )


def build_backbone(cfg: ModelConfig, in_channels: int) -> ResNetBackbone:
    """Randomly initialised backbone for `cfg` taking `in_channels`-channel images."""
    if cfg.arch not in _ARCHS:
        raise ValueError(
            f"model.arch: unknown architecture {cfg.arch!r}; use one of {list(_ARCHS)}"
        )
    if in_channels not in (1, 3):
        raise ValueError(f"in_channels must be 1 or 3, got {in_channels}")
    block, layers = _ARCHS[cfg.arch]
    return ResNetBackbone(
        block, layers, width=cfg.width, in_channels=in_channels, cifar_stem=cfg.cifar_stem
    )
