"""ShuffleNet for CIFAR (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural Network
for Mobile Devices", CVPR 2018), groups 3, stage widths 240/480/960: the CRD benchmark's ShuffleNetV1
(RepDistiller's ``ShuffleV1``, whose names and checkpoints this matches).

Taps: ``stem`` (1x1 conv-BN-ReLU), ``stage1..3`` (stage outputs: 16, 8, 4 pixels wide),
``stage1_pre..3_pre`` (the last unit's output before its ReLU), ``feat`` (pooled feature).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups: (N, g*c, H, W) -> (N, c*g, H, W)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 - shuffle - depthwise 3x3 - grouped 1x1; added to the input, or concatenated with its
    3x3 average pool when the unit downsamples (stride 2)."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        g = 1 if c_in == 24 else groups
        self.conv1 = nn.Conv2d(c_in, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.relu = nn.ReLU()
        self.preact = nn.Identity()  # tap point: before the final ReLU
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu_out(self.preact(out))


class ShuffleNetV1(nn.Module):
    """Args: widths (3 stage widths), blocks (units per stage), groups, num_classes."""

    def __init__(self, widths: tuple[int, int, int] = (240, 480, 960), blocks: tuple[int, int, int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c_in = 24
        for k, (width, n) in enumerate(zip(widths, blocks), start=1):
            units = []
            for i in range(n):
                # the downsampling unit concatenates its input, so its branch makes width - c_in channels
                units.append(ShuffleUnit(c_in, width - (c_in if i == 0 else 0), 2 if i == 0 else 1, groups))
                c_in = width
            setattr(self, f"layer{k}", nn.Sequential(*units))
        self.avgpool = nn.AvgPool2d(4)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(widths[-1], num_classes)
        self.taps = {"stem": "relu", "feat": "flatten"}
        for k, n in enumerate(blocks, start=1):
            self.taps[f"stage{k}"] = f"layer{k}"
            self.taps[f"stage{k}_pre"] = f"layer{k}.{n - 1}.preact"

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


def shufflenetv1(num_classes: int = 100) -> ShuffleNetV1:
    """ShuffleNet g=3 (0.95M parameters with 100 classes)."""
    return ShuffleNetV1(num_classes=num_classes)
