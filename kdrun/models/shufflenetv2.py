"""ShuffleNetV2 for CIFAR (Ma et al., "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design", ECCV 2018) at width 1x: 116/232/464 stage channels and a 1024-d head.

A 1x1 conv-BN-ReLU stem to 24 channels (no stride, no max-pool), three stages (a stride-2 down-sampling
unit followed by 3, 7 and 3 split units) on 16x16, 8x8 and 4x4 maps, a 1x1 conv-BN-ReLU to 1024
channels, 4x4 average pooling and a linear classifier.

This is the CRD (Tian et al., ICLR 2020) / DKD (Zhao et al., CVPR 2022) benchmark's ``ShuffleV2``
(RepDistiller's ``models/ShuffleNetv2.py``), whose parameter names this keeps.

Taps: ``stem`` (conv-BN-ReLU), ``stage1..3`` (stage outputs), ``feat`` (the pooled 1024-d feature after
the head conv), and ``stage1_pre..3_pre``: as in the reference, the last split unit's concatenation of
its untouched half and its branch before the branch's final ReLU, taken *before* the channel shuffle,
so its channel order differs from that of ``stage<k>`` (``stage = shuffle(relu(stage_pre))``).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from kdrun.models.shufflenetv1 import ChannelShuffle
from kdrun.models.zoo import register_model


class SplitUnit(nn.Module):
    """Split the channels in half; transform the second half (1x1 conv-BN-ReLU, depthwise 3x3-BN, 1x1
    conv-BN-ReLU); concatenate with the first half; shuffle.

    Args:
        channels: input and output channels.
        is_last: whether this is a stage's last unit, the one whose ``preact`` (the concatenation
            before the branch's final ReLU) is computed, as the reference does only there.
    """

    def __init__(self, channels: int, is_last: bool = False) -> None:
        super().__init__()
        c = channels // 2
        self.is_last = is_last
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)
        self.shuffle = ChannelShuffle(2)
        self.relu = nn.ReLU()
        self.preact = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x1, x2 = x.chunk(2, dim=1)
        branch = self.bn3(self.conv3(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x2)))))))
        if self.is_last:
            self.preact(torch.cat([x1, branch], 1))  # computed only as a hook point
        return self.shuffle(torch.cat([x1, self.relu(branch)], 1))


class DownUnit(nn.Module):
    """Two stride-2 branches on the whole input, concatenated and shuffled: depthwise 3x3-BN then 1x1
    conv-BN-ReLU (``conv1``, ``conv2``), and 1x1 conv-BN-ReLU, depthwise 3x3-BN, 1x1 conv-BN-ReLU
    (``conv3`` ... ``conv5``)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        mid = c_out // 2
        self.conv1 = nn.Conv2d(c_in, c_in, kernel_size=3, stride=2, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv2 = nn.Conv2d(c_in, mid, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(c_in, mid, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = nn.Conv2d(mid, mid, kernel_size=3, stride=2, padding=1, groups=mid, bias=False)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = nn.Conv2d(mid, mid, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid)
        self.shuffle = ChannelShuffle(2)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        left = self.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.relu(self.bn3(self.conv3(x)))
        right = self.relu(self.bn5(self.conv5(self.bn4(self.conv4(right)))))
        return self.shuffle(torch.cat([left, right], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 for 32x32 inputs.

    Args:
        widths: output channels of the three stages and of the head conv.
        blocks: split units per stage (after its down-sampling unit).
        num_classes: size of the output.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (116, 232, 464, 1024),
                 blocks: tuple[int, int, int] = (3, 7, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.relu = nn.ReLU()
        c_in = 24
        for k, (width, n) in enumerate(zip(widths[:3], blocks), start=1):
            units = [DownUnit(c_in, width)] + [SplitUnit(width, is_last=i == n - 1) for i in range(n)]
            setattr(self, f"layer{k}", nn.Sequential(*units))
            c_in = width
        self.conv2 = nn.Conv2d(widths[2], widths[3], kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(widths[3])
        self.relu_head = nn.ReLU()
        self.avgpool = nn.AvgPool2d(4)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(widths[3], num_classes)
        self.taps: dict[str, str] = {"stem": "relu"}
        for k, n in enumerate(blocks, start=1):
            self.taps[f"stage{k}"] = f"layer{k}"
            self.taps[f"stage{k}_pre"] = f"layer{k}.{n}.preact"  # unit 0 is the down-sampling unit
        self.taps["feat"] = "flatten"

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.relu_head(self.bn2(self.conv2(x)))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model(doc="ShuffleNetV2 1x for CIFAR (Ma et al. 2018), 1.356M parameters with 100 classes")
def shufflenetv2(num_classes: int = 100) -> nn.Module:
    """ShuffleNetV2 1x (1.356M parameters with 100 classes)."""
    return ShuffleNetV2(num_classes=num_classes)
