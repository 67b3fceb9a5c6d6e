"""ShuffleNet (V1) for CIFAR (Zhang et al., "ShuffleNet: An Extremely Efficient Convolutional Neural
Network for Mobile Devices", CVPR 2018) with 3 groups and 240/480/960 stage channels.

A 1x1 conv-BN-ReLU stem to 24 channels (no stride, no max-pool), three stages of 4, 8 and 4 ShuffleNet
units on 16x16, 8x8 and 4x4 maps, 4x4 average pooling and a linear classifier. The first unit of a
stage has stride 2 and concatenates its 3x3 average-pooled input to its branch; the others add it.

This is the CRD (Tian et al., ICLR 2020) / DKD (Zhao et al., CVPR 2022) benchmark's ``ShuffleV1``
(RepDistiller's ``models/ShuffleNetv1.py``), whose parameter names this keeps.

Taps: ``stem`` (conv-BN-ReLU), ``stage1..3`` (stage outputs), ``stage1_pre..3_pre`` (the last unit's
sum before its final ReLU), ``feat`` (the pooled 960-d feature).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdrun.models.zoo import register_model


class ChannelShuffle(nn.Module):
    """Interleave the channels of ``groups`` groups: (N, g*c, H, W) -> (N, c*g, H, W)."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.reshape(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """Grouped 1x1 conv, channel shuffle, depthwise 3x3 (carrying the stride), grouped 1x1 conv, each
    with BN (ReLU after the first two); then the input added (stride 1) or its 3x3 average pool
    concatenated (stride 2), and ReLU. ``preact`` marks the tensor before that ReLU as a hook point.

    Args:
        c_in: input channels. c_out: branch output channels (the unit's output has ``c_out + c_in``
            channels when it concatenates). stride: 1 or 2. groups: groups of the 1x1 convs.
    """

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid = c_out // 4
        g = 1 if c_in == 24 else groups  # the first unit, on the 24-channel stem, is not grouped
        self.conv1 = nn.Conv2d(c_in, mid, kernel_size=1, groups=g, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.shuffle1 = ChannelShuffle(g)
        self.conv2 = nn.Conv2d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=mid, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, c_out, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1)) if stride == 2 else nn.Sequential()
        self.relu = nn.ReLU()
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.shuffle1(self.relu(self.bn1(self.conv1(x))))
        out = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(out)))))
        res = self.shortcut(x)
        out = torch.cat([out, res], 1) if self.stride == 2 else out + res
        return self.relu_out(self.preact(out))


class ShuffleNetV1(nn.Module):
    """ShuffleNet for 32x32 inputs.

    Args:
        widths: output channels of the three stages.
        blocks: units per stage.
        groups: groups of the 1x1 convs.
        num_classes: size of the output.
    """

    def __init__(self, widths: tuple[int, int, int] = (240, 480, 960), blocks: tuple[int, int, int] = (4, 8, 4),
                 groups: int = 3, num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c_in = 24
        for k, (width, n) in enumerate(zip(widths, blocks), start=1):
            # the first unit concatenates its input, so its branch makes width - c_in channels
            units = [ShuffleUnit(c_in, width - c_in, stride=2, groups=groups)]
            units += [ShuffleUnit(width, width, stride=1, groups=groups) for _ in range(n - 1)]
            setattr(self, f"layer{k}", nn.Sequential(*units))
            c_in = width
        self.avgpool = nn.AvgPool2d(4)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(widths[-1], num_classes)
        self.taps: dict[str, str] = {"stem": "relu"}
        for k, n in enumerate(blocks, start=1):
            self.taps[f"stage{k}"] = f"layer{k}"
            self.taps[f"stage{k}_pre"] = f"layer{k}.{n - 1}.preact"
        self.taps["feat"] = "flatten"

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model(doc="ShuffleNet with 3 groups for CIFAR (Zhang et al. 2018), 0.949M parameters with 100 classes")
def shufflenetv1(num_classes: int = 100) -> nn.Module:
    """ShuffleNet with 3 groups (0.949M parameters with 100 classes)."""
    return ShuffleNetV1(num_classes=num_classes)
