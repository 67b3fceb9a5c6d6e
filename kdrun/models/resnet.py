"""ResNets for CIFAR (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016, Sec. 4.2).

A 3x3 conv-BN-ReLU stem and three stages of ``n`` basic blocks on 32x32, 16x16 and 8x8 maps (depth
6n + 2), 8x8 average pooling and one linear classifier. Where a block changes width or stride its
shortcut is a 1x1 conv + BN projection (the paper's option B; its CIFAR experiments used option A,
zero padding, so these nets have slightly more parameters than the paper's). ``resnet8x4`` and
``resnet32x4`` use 64/128/256 stage channels after a 32-channel stem instead of 16/32/64 after 16.

These are the networks of the CRD (Tian et al., ICLR 2020) and DKD (Zhao et al., CVPR 2022) CIFAR-100
benchmark: parameter and buffer names equal those of RepDistiller's ``models/resnet.py`` (and
mdistiller's copy), so the published ``{'model': state_dict}`` checkpoints load with ``strict=True``.

Taps (see :mod:`kdrun.taps`), the reference's ``is_feat`` features:

* ``stem``: conv-BN-ReLU output (feature 0), ``feat``: the pooled, flattened feature;
* ``stage1..3``: stage outputs (after the last block's ReLU);
* ``stage1_pre..3_pre``: the last block's residual sum before that ReLU (``preact=True``).
"""
from __future__ import annotations

from torch import Tensor, nn

from kdrun.models.zoo import register_model


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the input (or its projection), then ReLU.

    ``preact`` (an identity) marks the sum before the final ReLU as a hook point.
    """

    def __init__(self, c_in: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample  # name of the reference (and its checkpoints)
        self.preact = nn.Identity()
        self.relu_out = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu_out(self.preact(out + shortcut))


class CifarResNet(nn.Module):
    """Stem, three stages of basic blocks, global average pooling, linear classifier.

    Args:
        depth: 6n + 2 (n blocks per stage).
        widths: channels of the stem and of the three stages.
        num_classes: size of the output.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"a CIFAR ResNet has depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        self.layer1 = self._make_stage(widths[0], widths[1], n, stride=1)
        self.layer2 = self._make_stage(widths[1], widths[2], n, stride=2)
        self.layer3 = self._make_stage(widths[2], widths[3], n, stride=2)
        self.avgpool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        self.taps: dict[str, str] = {"stem": "relu"}
        for k in (1, 2, 3):
            self.taps[f"stage{k}"] = f"layer{k}"
            self.taps[f"stage{k}_pre"] = f"layer{k}.{n - 1}.preact"
        self.taps["feat"] = "flatten"
        # the BatchNorm whose output the pre-ReLU tap adds to the shortcut (OFD's margins, as mdistiller reads them)
        self.bn_before_relu = {f"stage{k}_pre": f"layer{k}.{n - 1}.bn2" for k in (1, 2, 3)}

    @staticmethod
    def _make_stage(c_in: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or c_in != planes:
            downsample = nn.Sequential(nn.Conv2d(c_in, planes, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes))
        layers = [BasicBlock(c_in, planes, stride, downsample)]
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.avgpool(x)))


_THIN = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model(doc="ResNet-8 for CIFAR (He et al. 2016), 0.084M parameters with 100 classes")
def resnet8(num_classes: int = 100) -> nn.Module:
    """ResNet-8 (0.084M parameters with 100 classes)."""
    return CifarResNet(8, _THIN, num_classes)


@register_model(doc="ResNet-14 for CIFAR (He et al. 2016), 0.181M parameters with 100 classes")
def resnet14(num_classes: int = 100) -> nn.Module:
    """ResNet-14 (0.181M parameters with 100 classes)."""
    return CifarResNet(14, _THIN, num_classes)


@register_model(doc="ResNet-20 for CIFAR (He et al. 2016), 0.278M parameters with 100 classes")
def resnet20(num_classes: int = 100) -> nn.Module:
    """ResNet-20 (0.278M parameters with 100 classes)."""
    return CifarResNet(20, _THIN, num_classes)


@register_model(doc="ResNet-32 for CIFAR (He et al. 2016), 0.473M parameters with 100 classes")
def resnet32(num_classes: int = 100) -> nn.Module:
    """ResNet-32 (0.473M parameters with 100 classes)."""
    return CifarResNet(32, _THIN, num_classes)


@register_model(doc="ResNet-44 for CIFAR (He et al. 2016), 0.667M parameters with 100 classes")
def resnet44(num_classes: int = 100) -> nn.Module:
    """ResNet-44 (0.667M parameters with 100 classes)."""
    return CifarResNet(44, _THIN, num_classes)


@register_model(doc="ResNet-56 for CIFAR (He et al. 2016), 0.862M parameters with 100 classes")
def resnet56(num_classes: int = 100) -> nn.Module:
    """ResNet-56 (0.862M parameters with 100 classes)."""
    return CifarResNet(56, _THIN, num_classes)


@register_model(doc="ResNet-110 for CIFAR (He et al. 2016), 1.737M parameters with 100 classes")
def resnet110(num_classes: int = 100) -> nn.Module:
    """ResNet-110 (1.737M parameters with 100 classes)."""
    return CifarResNet(110, _THIN, num_classes)


@register_model(doc=("ResNet-8x4 for CIFAR, 64/128/256-channel stages (He et al. 2016), "
                     "1.234M parameters with 100 classes"))
def resnet8x4(num_classes: int = 100) -> nn.Module:
    """ResNet-8 with 64/128/256 stage channels (1.234M parameters with 100 classes): the benchmark's student."""
    return CifarResNet(8, _WIDE, num_classes)


@register_model(doc=("ResNet-32x4 for CIFAR, 64/128/256-channel stages (He et al. 2016), "
                     "7.434M parameters with 100 classes"))
def resnet32x4(num_classes: int = 100) -> nn.Module:
    """ResNet-32 with 64/128/256 stage channels (7.434M parameters with 100 classes): the benchmark's teacher."""
    return CifarResNet(32, _WIDE, num_classes)
