"""Backbones: torchvision ResNets with a width option, a CIFAR stem and built-in input scaling.

The backbone takes float images in [0, 1] of shape [B, C, H, W] and returns pooled features
[B, D] (no classifier). Input normalisation lives inside the module so that every caller
(training, probes, policy scoring) feeds the same [0, 1] images: each channel is mapped by
``(x - 0.5) / 0.25``, a fixed, dataset-independent normalisation (no statistics to compute or
store, and the same for 1- and 3-channel data), which puts [0, 1] pixels in [-2, 2].
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from selfaugment.trainer.config import ModelConfig

INPUT_MEAN = 0.5
INPUT_STD = 0.25

# Blocks per stage, as in torchvision (He et al. 2016).
_ARCHS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
}


class ResNetBackbone(ResNet):
    """torchvision ResNet with stage widths [w, 2w, 4w, 8w] and no classifier.

    torchvision hard-codes 64 channels in the first stage (``width_per_group`` only scales the
    inner width of bottlenecks), so the stages are rebuilt here with torchvision's own blocks
    and ``_make_layer``; ``width=64`` gives exactly torchvision's layer shapes.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        width: int,
        in_channels: int,
        cifar_stem: bool,
    ) -> None:
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = width
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
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
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Identity()
        self.feature_dim = 8 * width * block.expansion
        self.in_channels = in_channels
        self.width = width
        self.cifar_stem = cifar_stem
        self.expansion = block.expansion
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
        stem_stride = 1 if self.cifar_stem else 2
        stem = self.width * math.ceil(height / stem_stride) * math.ceil(width / stem_stride)
        pool_stride = 1 if self.cifar_stem else 2
        stage = (
            self.width
            * self.expansion
            * math.ceil(height / stem_stride / pool_stride)
            * math.ceil(width / stem_stride / pool_stride)
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
