"""ResNet-50 for CIFAR (He et al., CVPR 2016, bottleneck blocks [3, 4, 6, 3]) with a 3x3 stride-1 stem
and no max-pool, for 32x32 inputs: the CRD benchmark's ResNet50 teacher (RepDistiller's
``resnetv2.ResNet50``, whose names and checkpoints this matches).

Taps: ``stem`` (conv-BN-ReLU), ``stage1..4`` (stage outputs: 32, 16, 8, 4 pixels wide),
``stage1_pre..4_pre`` (the last block's sum before its final ReLU), ``feat`` (pooled 2048-d feature).
"""
from __future__ import annotations

from torch import Tensor, nn


class Bottleneck(nn.Module):
    """1x1 reduce - 3x3 - 1x1 expand (x4), plus the (projected) input, then ReLU."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        c_out = planes * self.expansion
        self.conv1 = nn.Conv2d(c_in, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, c_out, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))
        return self.relu_out(self.preact(self.bn3(self.conv3(out)) + self.shortcut(x)))


class ResNetCifar(nn.Module):
    """Bottleneck ResNet with a CIFAR stem. Args: blocks per stage, num_classes."""

    def __init__(self, blocks: tuple[int, ...] = (3, 4, 6, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        c_in = 64
        for k, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            layer = []
            for i in range(n):
                layer.append(Bottleneck(c_in, planes, (1 if k == 1 else 2) if i == 0 else 1))
                c_in = planes * Bottleneck.expansion
            setattr(self, f"layer{k}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.taps = {"stem": "relu", "feat": "flatten"}
        for k, n in enumerate(blocks, start=1):
            self.taps[f"stage{k}"] = f"layer{k}"
            self.taps[f"stage{k}_pre"] = f"layer{k}.{n - 1}.preact"

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))


def resnet50(num_classes: int = 100) -> ResNetCifar:
    """ResNet-50 for CIFAR (23.71M parameters with 100 classes)."""
    return ResNetCifar((3, 4, 6, 3), num_classes)
