"""Wide residual networks for CIFAR (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

WRN-d-k: a 16-channel 3x3 stem conv, three groups of (d - 4) / 6 pre-activation blocks (BN-ReLU-conv)
with 16k, 32k and 64k channels on 32x32, 16x16 and 8x8 maps, a final BN-ReLU, 8x8 average pooling and
a linear classifier. The first block of a group that changes width has a 1x1 conv shortcut applied to
its activated input.

These are the CRD (Tian et al., ICLR 2020) / DKD (Zhao et al., CVPR 2022) benchmark's WRNs: names equal
those of RepDistiller's ``models/wrn.py`` (``block1.layer.0.convShortcut``, ...), so its checkpoints
(e.g. ``wrn_40_2_vanilla``) load with ``strict=True``.

Taps follow the reference's ``is_feat`` features, which differ from the post-activation convention of
the other zoo models because the blocks are pre-activation ones:

* ``stem``: the stem conv's output (no BN/ReLU: the reference's feature 0);
* ``stage1..3``: the groups' outputs, residual sums that no ReLU has touched yet;
* ``stage1_pre..3_pre``: those outputs through the BatchNorm that comes next (the next group's first
  ``bn1``, and the final ``bn1``): the reference's ``preact=True`` features. They are hooked at those
  BN modules, which compute exactly this tensor in the forward pass;
* ``feat``: the pooled feature after the final BN-ReLU.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from kdrun.models.zoo import register_model


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the input; when the width changes the shortcut is a 1x1
    conv of the activated input (BN-ReLU(x)) rather than of x."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.equal_in_out = c_in == c_out
        # the reference's (camel-case) name, which its checkpoints carry
        self.convShortcut = None if self.equal_in_out else nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv2(self.drop(self.relu2(self.bn2(self.conv1(act)))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class NetworkBlock(nn.Module):
    """A group of ``n`` wide blocks; the first one may change width and stride."""

    def __init__(self, n: int, c_in: int, c_out: int, stride: int, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1, drop_rate) for i in range(n)
        ])

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    """WRN-depth-k for 32x32 inputs.

    Args:
        depth: 6n + 4 (n blocks per group).
        widen_factor: k.
        num_classes: size of the output.
        drop_rate: dropout between the two convs of each block (0 in the benchmark).
    """

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100, drop_rate: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"a WRN has depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.avgpool = nn.AvgPool2d(8)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
        self.taps: dict[str, str] = {
            "stem": "conv1",
            "stage1": "block1", "stage2": "block2", "stage3": "block3",
            "stage1_pre": "block2.layer.0.bn1", "stage2_pre": "block3.layer.0.bn1", "stage3_pre": "bn1",
            "feat": "flatten",
        }
        # pre-activation blocks: each pre-ReLU tap is itself the BatchNorm OFD's margins come from (as in mdistiller)
        self.bn_before_relu = {k: v for k, v in self.taps.items() if k.endswith("_pre")}

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.flatten(self.avgpool(self.relu(self.bn1(x)))))


@register_model(doc="WRN-16-1 for CIFAR (Zagoruyko & Komodakis 2016), 0.181M parameters with 100 classes")
def wrn_16_1(num_classes: int = 100) -> nn.Module:
    """WRN-16-1 (0.181M parameters with 100 classes)."""
    return WideResNet(16, 1, num_classes)


@register_model(doc="WRN-16-2 for CIFAR (Zagoruyko & Komodakis 2016), 0.703M parameters with 100 classes")
def wrn_16_2(num_classes: int = 100) -> nn.Module:
    """WRN-16-2 (0.703M parameters with 100 classes)."""
    return WideResNet(16, 2, num_classes)


@register_model(doc="WRN-40-1 for CIFAR (Zagoruyko & Komodakis 2016), 0.570M parameters with 100 classes")
def wrn_40_1(num_classes: int = 100) -> nn.Module:
    """WRN-40-1 (0.570M parameters with 100 classes)."""
    return WideResNet(40, 1, num_classes)


@register_model(doc="WRN-40-2 for CIFAR (Zagoruyko & Komodakis 2016), 2.255M parameters with 100 classes")
def wrn_40_2(num_classes: int = 100) -> nn.Module:
    """WRN-40-2 (2.255M parameters with 100 classes)."""
    return WideResNet(40, 2, num_classes)
