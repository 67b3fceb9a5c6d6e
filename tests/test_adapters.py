"""ConvRegressor (FitNets' regressor, RepDistiller ConvReg semantics) and LinearEmbed."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from kdrun.models.adapters import ConvRegressor, LinearEmbed


@pytest.mark.parametrize(
    ("in_size", "out_size", "kind", "kernel", "stride"),
    [
        (16, 8, nn.Conv2d, (3, 3), (2, 2)),           # student twice as large
        (8, 16, nn.ConvTranspose2d, (4, 4), (2, 2)),  # student half as large
        (8, 8, nn.Conv2d, (1, 1), (1, 1)),            # equal
        (10, 8, nn.Conv2d, (3, 3), (1, 1)),           # larger by 2: valid 3x3 conv
        (2, 1, nn.Conv2d, (3, 3), (2, 2)),            # 2x case wins over the ">=" case
        ((8, 6), (4, 3), nn.Conv2d, (3, 3), (2, 2)),  # non-square, twice as large
        ((9, 8), (8, 6), nn.Conv2d, (2, 3), (1, 1)),  # non-square, larger
    ],
)
def test_conv_regressor_cases(in_size, out_size, kind, kernel, stride):
    reg = ConvRegressor(6, 10, in_size, out_size)
    assert type(reg.conv) is kind
    assert tuple(reg.conv.kernel_size) == kernel and tuple(reg.conv.stride) == stride
    h, w = (in_size, in_size) if isinstance(in_size, int) else in_size
    oh, ow = (out_size, out_size) if isinstance(out_size, int) else out_size
    y = reg(torch.randn(2, 6, h, w))
    assert y.shape == (2, 10, oh, ow)
    assert (y >= 0).all()  # ends with ReLU


def test_conv_regressor_equal_sizes_by_default_and_options():
    reg = ConvRegressor(4, 8)
    assert tuple(reg.conv.kernel_size) == (1, 1)
    assert reg(torch.randn(3, 4, 5, 7)).shape == (3, 8, 5, 7)  # any size when sizes are not given
    assert isinstance(reg.bn, nn.BatchNorm2d) and reg.bn.num_features == 8
    no_relu = ConvRegressor(4, 8, 4, 4, use_relu=False)
    assert (no_relu(torch.randn(4, 4, 4, 4)) < 0).any()


def test_conv_regressor_trains():
    reg = ConvRegressor(3, 5, 8, 4)
    x = torch.randn(4, 3, 8, 8, requires_grad=True)
    reg(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and reg.conv.weight.grad.abs().sum() > 0


def test_conv_regressor_errors():
    with pytest.raises(ValueError, match="cannot map a student map of size \\(5, 5\\) onto a teacher map of size \\(8, 8\\)"):
        ConvRegressor(4, 8, 5, 8)
    with pytest.raises(ValueError, match="cannot map"):
        ConvRegressor(4, 8, (8, 4), (4, 8))  # larger in one dimension, smaller in the other
    with pytest.raises(ValueError, match="both in_size and out_size or neither"):
        ConvRegressor(4, 8, 8, None)
    with pytest.raises(ValueError, match="positive"):
        ConvRegressor(4, 8, 0, 0)
    with pytest.raises(ValueError, match="channel"):
        ConvRegressor(0, 8)
    reg = ConvRegressor(4, 8, 8, 4)
    with pytest.raises(ValueError, match=r"expected input \(batch, 4, H, W\)"):
        reg(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="built for input size"):
        reg(torch.randn(2, 4, 16, 16))


def test_linear_embed():
    emb = LinearEmbed(12, 5)
    assert emb(torch.randn(3, 3, 2, 2)).shape == (3, 5)
    assert LinearEmbed(7)(torch.randn(2, 7)).shape == (2, 128)
