"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018) at width 0.5 with expansion 6: the CRD benchmark's student (RepDistiller's ``mobile_half``,
whose names and checkpoints this matches). The stem has stride 2 (32x32 -> 16x16).

Taps, as RepDistiller's features: ``stem``, ``stage1..4`` = the outputs of block groups 1, 2, 4 and 6
(16, 8, 4 and 2 pixels wide). Blocks end linearly (no ReLU), so ``stage<k>_pre`` is the same tensor.
``feat`` is the pooled 1280-d feature.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

# expansion t, channels c, repeats n, first stride s (the reference's setting)
SETTING = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection, with a residual when shapes allow."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.use_res_connect = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs. Args: expansion (T), width_mult, num_classes."""

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        c_in = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, c_in, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTING:
            c_out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, expansion if t != 1 else 1))
                c_in = c_out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c_in, self.last_channel, 1, 1)
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        self.taps = {"stem": "conv1", "feat": "flatten"}
        for k, group in enumerate((1, 2, 4, 6), start=1):
            self.taps[f"stage{k}"] = self.taps[f"stage{k}_pre"] = f"blocks.{group}"

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for block in self.blocks:
            x = block(x)
        return self.classifier(self.flatten(self.avgpool(self.conv2(x))))


def mobilenetv2(num_classes: int = 100) -> MobileNetV2:
    """MobileNetV2 x0.5, expansion 6 (0.81M parameters with 100 classes)."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
