"""ResNet-50 for CIFAR (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

The ImageNet bottleneck layout, [3, 4, 6, 3] blocks with 64/128/256/512 bottleneck widths (x4 output
channels), with a CIFAR stem: one 3x3 stride-1 conv and no max-pool, so the four stages run on
32x32, 16x16, 8x8 and 4x4 maps. Shortcuts are 1x1 conv + BN projections where the shape changes.

This is the CRD (Tian et al., ICLR 2020) / DKD (Zhao et al., CVPR 2022) benchmark's ``ResNet50``
teacher: names equal those of RepDistiller's ``models/resnetv2.py`` (``shortcut``, ``linear``), so
its ``ResNet50_vanilla`` checkpoint loads with ``strict=True``.

Taps: ``stem`` (conv-BN-ReLU), ``stage1..4`` (stage outputs), ``stage1_pre..4_pre`` (the last block's
residual sum before its final ReLU), ``feat`` (the pooled 2048-d feature).
"""
from __future__ import annotations

from torch import Tensor, nn

from kdrun.models.zoo import register_model


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4), each with BN; plus the input (or its
    projection), then ReLU. ``preact`` marks the sum before that ReLU as a hook point."""

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
        self.shortcut = nn.Sequential()  # an empty Sequential is the identity
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(c_out))
        self.relu = nn.ReLU()
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu_out(self.preact(out + self.shortcut(x)))


class CifarBottleneckResNet(nn.Module):
    """Bottleneck ResNet with a CIFAR stem.

    Args:
        blocks: bottleneck blocks in each of the four stages.
        num_classes: size of the output.
    """

    def __init__(self, blocks: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 100) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU()
        c_in = 64
        for k, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            stride = 1 if k == 1 else 2
            layers = []
            for i in range(n):
                layers.append(Bottleneck(c_in, planes, stride if i == 0 else 1))
                c_in = planes * Bottleneck.expansion
            setattr(self, f"layer{k}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.taps: dict[str, str] = {"stem": "relu"}
        for k, n in enumerate(blocks, start=1):
            self.taps[f"stage{k}"] = f"layer{k}"
            self.taps[f"stage{k}_pre"] = f"layer{k}.{n - 1}.preact"
        self.taps["feat"] = "flatten"
        # the BatchNorm whose output the pre-ReLU tap adds to the shortcut (OFD's margins, as mdistiller reads them)
        self.bn_before_relu = {f"stage{k}_pre": f"layer{k}.{n - 1}.bn3" for k, n in enumerate(blocks, start=1)}

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.linear(self.flatten(self.avgpool(x)))


@register_model(doc=("ResNet-50 for CIFAR, bottlenecks [3, 4, 6, 3] and a 3x3 stem (He et "
                     "al. 2016), 23.705M parameters with 100 classes"))
def resnet50(num_classes: int = 100) -> nn.Module:
    """ResNet-50 for CIFAR (23.705M parameters with 100 classes)."""
    return CifarBottleneckResNet((3, 4, 6, 3), num_classes)
