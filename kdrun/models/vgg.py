"""VGG with BatchNorm for CIFAR (Simonyan & Zisserman, "Very Deep Convolutional Networks for
Large-Scale Image Recognition", ICLR 2015), without the large fully connected layers.

Five blocks of conv3x3(+bias)-BN-ReLU layers (configurations A, B, D, E of the paper for VGG-11/13/16/19,
and "S", one conv per block, for VGG-8), 2x2 max-pooling after blocks 0, 1 and 2, global average pooling
and one 512 -> num_classes linear layer. On 32x32 inputs blocks 3 and 4 both run on 4x4 maps: the
max-pool after block 3 is applied to 64x64 inputs only, as in the reference.

These are the CRD (Tian et al., ICLR 2020) / DKD (Zhao et al., CVPR 2022) benchmark's ``vgg*`` models
(RepDistiller's ``vgg*_bn``): each block is an ``nn.Sequential`` of conv, BN, ReLU, ..., conv, BN (the
block's last ReLU is applied outside it), so names such as ``block0.0.weight``, ``block0.1.running_mean``
and ``classifier.weight`` equal the reference's and its checkpoints (``vgg13_vanilla``) load strictly.

Taps, the reference's ``is_feat`` features (block 0 is the stem, blocks 1-4 the four stages):

* ``stem``: block 0 after its ReLU (``relu0``);
* ``stage1..4``: blocks 1-4 after their ReLU (``relu1..relu4``);
* ``stage1_pre..4_pre``: blocks 1-4 before it, i.e. their last BN's output (``block1..block4``);
* ``feat``: the pooled 512-d feature.
"""
from __future__ import annotations

import math

from torch import Tensor, nn

from kdrun.models.zoo import register_model

# conv widths of the five blocks
CONFIGS: dict[str, list[list[int]]] = {
    "S": [[64], [128], [256], [512], [512]],
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "D": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "E": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _block(c_in: int, widths: list[int]) -> nn.Sequential:
    """conv3x3-BN-ReLU for each width, without the last ReLU."""
    layers: list[nn.Module] = []
    for w in widths:
        layers += [nn.Conv2d(c_in, w, kernel_size=3, padding=1), nn.BatchNorm2d(w), nn.ReLU()]
        c_in = w
    return nn.Sequential(*layers[:-1])


class VGG(nn.Module):
    """VGG-BN for CIFAR.

    Args:
        cfg: conv widths of the five blocks (the last block must end with 512).
        num_classes: size of the output.
    """

    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        c_in = 3
        for i, widths in enumerate(cfg):
            setattr(self, f"block{i}", _block(c_in, widths))
            c_in = widths[-1]
        for i in range(len(cfg)):
            setattr(self, f"relu{i}", nn.ReLU())
        self.pool0 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool2 = nn.MaxPool2d(kernel_size=2, stride=2)
        self.pool3 = nn.MaxPool2d(kernel_size=2, stride=2)  # 64x64 inputs only
        self.pool4 = nn.AdaptiveAvgPool2d((1, 1))
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)
        self.taps: dict[str, str] = {"stem": "relu0"}
        for k in (1, 2, 3, 4):
            self.taps[f"stage{k}"] = f"relu{k}"
            self.taps[f"stage{k}_pre"] = f"block{k}"
        self.taps["feat"] = "flatten"
        # each block ends with the BatchNorm that its pre-ReLU tap is (OFD's margins, as mdistiller reads them)
        self.bn_before_relu = {f"stage{k}_pre": f"block{k}.{len(getattr(self, f'block{k}')) - 1}" for k in (1, 2, 3, 4)}

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2]
        x = self.pool0(self.relu0(self.block0(x)))
        x = self.pool1(self.relu1(self.block1(x)))
        x = self.pool2(self.relu2(self.block2(x)))
        x = self.relu3(self.block3(x))
        if size == 64:
            x = self.pool3(x)
        x = self.relu4(self.block4(x))
        return self.classifier(self.flatten(self.pool4(x)))


@register_model(doc="VGG-8 with BatchNorm for CIFAR (Simonyan & Zisserman 2015), 3.965M parameters with 100 classes")
def vgg8(num_classes: int = 100) -> nn.Module:
    """VGG-8 with BN, configuration "S" (3.965M parameters with 100 classes)."""
    return VGG(CONFIGS["S"], num_classes)


@register_model(doc="VGG-11 with BatchNorm for CIFAR (Simonyan & Zisserman 2015), 9.277M parameters with 100 classes")
def vgg11(num_classes: int = 100) -> nn.Module:
    """VGG-11 with BN, configuration "A" (9.277M parameters with 100 classes)."""
    return VGG(CONFIGS["A"], num_classes)


@register_model(doc="VGG-13 with BatchNorm for CIFAR (Simonyan & Zisserman 2015), 9.462M parameters with 100 classes")
def vgg13(num_classes: int = 100) -> nn.Module:
    """VGG-13 with BN, configuration "B" (9.462M parameters with 100 classes)."""
    return VGG(CONFIGS["B"], num_classes)


@register_model(doc="VGG-16 with BatchNorm for CIFAR (Simonyan & Zisserman 2015), 14.774M parameters with 100 classes")
def vgg16(num_classes: int = 100) -> nn.Module:
    """VGG-16 with BN, configuration "D" (14.774M parameters with 100 classes)."""
    return VGG(CONFIGS["D"], num_classes)


@register_model(doc="VGG-19 with BatchNorm for CIFAR (Simonyan & Zisserman 2015), 20.087M parameters with 100 classes")
def vgg19(num_classes: int = 100) -> nn.Module:
    """VGG-19 with BN, configuration "E" (20.087M parameters with 100 classes)."""
    return VGG(CONFIGS["E"], num_classes)
