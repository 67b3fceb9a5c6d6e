"""ResNets for CIFAR (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

Three stages of basic blocks on 32x32 inputs (32x32, 16x16, 8x8 maps), depth 6n+2. ``resnet8x4`` and
``resnet32x4`` widen the stages to 64/128/256 channels (a 32-channel stem): the CRD/DKD benchmark's
teacher and student. Parameter and buffer names equal those of the CRD code base (RepDistiller), so
its published ``{'model': state_dict}`` checkpoints load as they are.

Taps: ``stem`` (conv-BN-ReLU), ``stage1..3`` (stage outputs), ``stage1_pre..3_pre`` (the last block's
sum before its final ReLU), ``feat`` (pooled feature).
"""
from __future__ import annotations

from torch import Tensor, nn


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the (projected) input, then ReLU."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.preact = nn.Identity()  # tap point: the sum before the final ReLU
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu_out(self.preact(out + shortcut))


class CifarResNet(nn.Module):
    """Stem conv3x3-BN-ReLU, three stages of ``n`` basic blocks, 8x8 average pool, linear classifier.

    Args:
        depth: 6n + 2. widths: stem and stage channels (4 numbers). num_classes: classes.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_layer(widths[1], n, stride=1)
        self.layer2 = self._make_layer(widths[2], n, stride=2)
        self.layer3 = self._make_layer(widths[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        last = n - 1
        self.taps = {"stem": "relu", "feat": "flatten"}
        for k in (1, 2, 3):
            self.taps[f"stage{k}"] = f"layer{k}"
            self.taps[f"stage{k}_pre"] = f"layer{k}.{last}.preact"

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


def resnet8(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 (0.08M parameters with 100 classes)."""
    return CifarResNet(8, _THIN, num_classes)


def resnet14(num_classes: int = 100) -> CifarResNet:
    """ResNet-14 (0.18M)."""
    return CifarResNet(14, _THIN, num_classes)


def resnet20(num_classes: int = 100) -> CifarResNet:
    """ResNet-20 (0.28M)."""
    return CifarResNet(20, _THIN, num_classes)


def resnet32(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 (0.47M)."""
    return CifarResNet(32, _THIN, num_classes)


def resnet44(num_classes: int = 100) -> CifarResNet:
    """ResNet-44 (0.67M)."""
    return CifarResNet(44, _THIN, num_classes)


def resnet56(num_classes: int = 100) -> CifarResNet:
    """ResNet-56 (0.86M)."""
    return CifarResNet(56, _THIN, num_classes)


def resnet110(num_classes: int = 100) -> CifarResNet:
    """ResNet-110 (1.74M)."""
    return CifarResNet(110, _THIN, num_classes)


def resnet8x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-8 with 4x wider stages (1.23M): the benchmark's student."""
    return CifarResNet(8, _WIDE, num_classes)


def resnet32x4(num_classes: int = 100) -> CifarResNet:
    """ResNet-32 with 4x wider stages (7.43M): the benchmark's teacher."""
    return CifarResNet(32, _WIDE, num_classes)
