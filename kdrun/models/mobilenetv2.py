"""MobileNetV2 for CIFAR (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks",
CVPR 2018) at width multiplier 0.5 with expansion 6.

A stride-2 3x3 conv-BN-ReLU stem, seven groups of inverted residual blocks (1x1 expand, 3x3 depthwise,
1x1 linear projection, each with BN; a residual where shapes allow), a 1x1 conv-BN-ReLU to 1280
channels (not scaled down by the width multiplier), 2x2 average pooling and a linear classifier. The
paper's table of groups is kept except that the second group has stride 1, so a 32x32 input is reduced
to 16x16 by the stem and to 2x2 at the end.

This is the CRD (Tian et al., ICLR 2020) / DKD (Zhao et al., CVPR 2022) benchmark's ``MobileNetV2``
(RepDistiller's ``mobile_half``): names equal the reference's (``conv1.0``, ``blocks.3.2.conv.4``,
``classifier.0``), so its checkpoints load with ``strict=True``.

Taps, the reference's ``is_feat`` features: ``stem`` (the stem's output, 16x16), ``stage1..4`` (the
outputs of groups 1, 2, 4 and 6, i.e. the last group of each resolution: 16x16, 8x8, 4x4, 2x2) and
``feat`` (the pooled 1280-d feature). The blocks end linearly (no ReLU after the projection), and the
reference returns the same features with ``preact=True``, so ``stage<k>_pre`` is ``stage<k>``.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from kdrun.models.zoo import register_model

# (expansion t, output channels c, blocks n, stride of the first block s); t = 6 stands for the model's
# ``expansion``. Sandler et al., Table 2, with s = 1 instead of 2 in the second row for 32x32 inputs.
SETTING: list[tuple[int, int, int, int]] = [
    (1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
]
# the groups whose outputs are the stage taps (the last group at each resolution)
STAGE_GROUPS = (1, 2, 4, 6)


def _conv_bn_relu(c_in: int, c_out: int, kernel: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU())


class InvertedResidual(nn.Module):
    """1x1 expand - 3x3 depthwise - 1x1 linear projection (``conv.0`` ... ``conv.7``), with the input
    added when stride is 1 and the width is unchanged."""

    def __init__(self, c_in: int, c_out: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = c_in * expansion
        self.use_res_connect = stride == 1 and c_in == c_out
        self.conv = nn.Sequential(
            nn.Conv2d(c_in, hidden, 1, 1, 0, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU(),
            nn.Conv2d(hidden, c_out, 1, 1, 0, bias=False), nn.BatchNorm2d(c_out),
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs.

    Args:
        expansion: expansion factor of the blocks after the first group (T).
        width_mult: multiplier of the stem and block widths (the 1280-d head is kept below 1).
        num_classes: size of the output.
    """

    def __init__(self, expansion: int = 6, width_mult: float = 0.5, num_classes: int = 100) -> None:
        super().__init__()
        c_in = int(32 * width_mult)
        self.conv1 = _conv_bn_relu(3, c_in, 3, 2)
        self.blocks = nn.ModuleList()
        for t, c, n, s in SETTING:
            c_out = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, 1 if t == 1 else expansion))
                c_in = c_out
            self.blocks.append(nn.Sequential(*layers))
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(c_in, self.last_channel, 1, 1)
        self.avgpool = nn.AvgPool2d(2, ceil_mode=True)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        self.taps: dict[str, str] = {"stem": "conv1"}
        for k, group in enumerate(STAGE_GROUPS, start=1):
            self.taps[f"stage{k}"] = self.taps[f"stage{k}_pre"] = f"blocks.{group}"
        self.taps["feat"] = "flatten"

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        for group in self.blocks:
            x = group(x)
        return self.classifier(self.flatten(self.avgpool(self.conv2(x))))


@register_model(doc=("MobileNetV2 x0.5, expansion 6, for CIFAR (Sandler et al. 2018), "
                     "0.813M parameters with 100 classes"))
def mobilenetv2(num_classes: int = 100) -> nn.Module:
    """MobileNetV2 x0.5 with expansion 6 (0.813M parameters with 100 classes)."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
