"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, ICLR 2015), without the large FC layers.

Five conv blocks (the last ReLU of each block is applied outside it, so the block output is the
pre-activation), max-pooling between blocks 0-3 except before block 4 on 32x32 inputs, global average
pooling and one linear classifier, as in the CRD code base (RepDistiller) whose names and checkpoints
this matches. ``vgg8`` is its configuration "S" (one conv per block).

Taps: ``stem`` (block 0 after ReLU), ``stage1..4`` (blocks 1-4 after ReLU), ``stage1_pre..4_pre``
(blocks 1-4 before it), ``feat`` (pooled feature).
"""
from __future__ import annotations

import math

from torch import Tensor, nn

CONFIGS: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(widths: list[int], c_in: int) -> nn.Sequential:
    """conv3x3-BN-ReLU for each width, without the final ReLU."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        c_in = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for CIFAR. Args: cfg: widths per block (5 lists). num_classes: classes."""

    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        c_in = 3
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _block(widths, c_in))
            setattr(self, f"relu{i}", nn.ReLU())
            c_in = widths[-1]
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)  # used for 64x64 inputs only
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        self.taps = {"stem": "relu0", "feat": "flatten"}
        for k in (1, 2, 3, 4):
            self.taps[f"stage{k}"] = f"relu{k}"
            self.taps[f"stage{k}_pre"] = f"block{k}"

    def forward(self, x: Tensor) -> Tensor:
        h = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if h == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.flatten(self.pool4(x)))


def vgg8(num_classes: int = 100) -> VGG:
    """VGG-8 with BN (3.97M parameters with 100 classes)."""
    return VGG(CONFIGS["S"], num_classes)


def vgg11(num_classes: int = 100) -> VGG:
    """VGG-11 with BN (9.28M)."""
    return VGG(CONFIGS["A"], num_classes)


def vgg13(num_classes: int = 100) -> VGG:
    """VGG-13 with BN (9.46M)."""
    return VGG(CONFIGS["B"], num_classes)


def vgg16(num_classes: int = 100) -> VGG:
    """VGG-16 with BN (14.77M)."""
    return VGG(CONFIGS["D"], num_classes)


def vgg19(num_classes: int = 100) -> VGG:
    """VGG-19 with BN (20.09M)."""
    return VGG(CONFIGS["E"], num_classes)
