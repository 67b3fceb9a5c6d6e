"""Knowledge review (ReviewKD): attention-based fusion (ABF) across stages, hierarchical context loss (HCL)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext
from kdrun.losses.base import LossTerm
from kdrun.losses.features import Shapes, as_shape_list, as_tensor_list, full_precision, to_float


def _as_map(x: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, 1); (B, C, H, W) unchanged."""
    return x.reshape(x.shape[0], x.shape[1], 1, 1) if x.dim() == 2 else x


def _map_shape(s: tuple[int, ...]) -> tuple[int, ...]:
    return (s[0], s[1], 1, 1) if len(s) == 2 else s


class ABF(nn.Module):
    """Attention-based fusion of one student stage with the fused result of the deeper stages.

    ``x`` (the student's map) goes through a 1x1 conv + BN to ``mid_channels``; where there is a deeper
    residual ``y`` (already at ``mid_channels``), it is resized (nearest) to ``x``'s size, and a 1x1 conv on
    ``[x, y]`` followed by a sigmoid gives two spatial attention maps ``a, b`` (B, 1, H, W); the fusion is
    ``a * x + b * y``. The fused map is resized (nearest) to the teacher's spatial size when that differs,
    passed on as the next residual, and mapped by a 3x3 conv + BN to the teacher's channels (the output
    compared with the teacher). Convs without bias are initialised Kaiming-uniform with ``a = 1``.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
                                   nn.BatchNorm2d(mid_channels))
        self.conv2 = nn.Sequential(nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
                                   nn.BatchNorm2d(out_channels))
        self.att_conv = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, kernel_size=1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None, out_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Return ``(output at the teacher's shape, fused map for the next, shallower stage)``."""
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("ReviewKD: a fusing ABF needs the residual of the deeper stages")
            residual = F.interpolate(residual, size=tuple(x.shape[-2:]), mode="nearest")
            att = self.att_conv(torch.cat([x, residual], dim=1))
            x = x * att[:, 0:1] + residual * att[:, 1:2]
        if tuple(x.shape[-2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def hcl_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], levels: Sequence[int] = (4, 2, 1)) -> Tensor:
    """Hierarchical context loss: per pair, the MSE of the full maps plus the MSEs of the maps
    adaptive-average-pooled to each ``l x l`` in ``levels`` smaller than the map's height, with weights
    1, 1/2, 1/4, ... (halving over the levels used), divided by the sum of the weights; summed over pairs."""
    total = None
    for fs, ft in zip(student, teacher):
        h = fs.shape[2]
        loss = F.mse_loss(fs, ft)
        w, tot = 1.0, 1.0
        for lv in levels:
            if lv >= h:
                continue
            w /= 2.0
            loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(fs, (lv, lv)), F.adaptive_avg_pool2d(ft, (lv, lv)))
            tot += w
        loss = loss / tot
        total = loss if total is None else total + loss
    assert total is not None
    return total


class ReviewKDLoss(LossTerm):
    """Knowledge review, Chen, Liu, Zhao & Jia, "Distilling Knowledge via Knowledge Review", CVPR 2021
    (ReviewKD), as in the authors' code (dvlab-research/ReviewKD) and mdistiller.

    A student stage is compared not with the teacher's same stage alone but with a *review* of the
    student's deeper stages: going from the deepest student feature to the shallowest, an attention-based
    fusion module (:class:`ABF`) per stage merges the stage's own map with the fused result of all deeper
    stages (the residual), and outputs a map of the teacher stage's shape. With ``O_i`` the output for
    stage ``i`` and ``T_i`` the teacher's feature, the hierarchical context loss (:func:`hcl_loss`) is
    ``sum_i [MSE(O_i, T_i) + sum_l 2^-l MSE(pool_l O_i, pool_l T_i)] / (1 + sum_l 2^-l)`` over pyramid
    levels ``4x4, 2x2, 1x1`` (those smaller than the map). The ABF modules are created in :meth:`setup`
    (``mid_channels = min(max_mid_channels, C_student of the deepest input)``; the deepest ABF does not fuse)
    and train with the student. The teacher gets no gradient. (B, C) inputs, such as the pooled
    ``feat``, are read as (B, C, 1, 1) maps.

    The warm-up of the published recipe, ``min(epoch / 20, 1)``, is the engine's ``warmup_epochs: 20``
    (the authors' code counts epochs from 0, so its first epoch has weight 0; mdistiller and kdrun
    from 1, i.e. 1/20).

    Args:
        max_mid_channels: cap on the fusion width (default 512).
        levels: the HCL pyramid (default ``(4, 2, 1)``).

    CIFAR-100 settings (the DKD table copies ReviewKD's own numbers; the authors' script
    ``CIFAR-100/script/reviewKD.sh``; mdistiller's default weight is 1.0 and its resnet32x4 -> resnet8x4
    config sets 5.0): cross-entropy weight 1, term weight 5.0 for wrn_40_2 -> wrn_16_2, wrn_40_2 -> wrn_40_1,
    wrn_40_2 -> shufflenetv1, resnet32x4 -> resnet8x4, resnet32x4 -> shufflenetv1; 8.0 for resnet32x4 ->
    shufflenetv2; 0.6 for resnet56 -> resnet20; 1.0 for resnet110 -> resnet32. The script has no line for
    the DKD table's vgg13 -> vgg8, vgg13 -> mobilenetv2 and resnet50 -> mobilenetv2 (mdistiller's default
    is 1.0). Warm-up 20 epochs. Inputs (shallow to deep, equal-length lists): ``student``:
    ``[stage1, .., stageK, feat]`` (post-ReLU stage outputs, mdistiller's ``STU_PREACT: False``);
    ``teacher``: ``[stage1_pre, .., stageK_pre, feat]`` (pre-ReLU stage outputs, as both code bases).
    """

    def __init__(self, max_mid_channels: int = 512, levels: Sequence[int] = (4, 2, 1)) -> None:
        super().__init__()
        if max_mid_channels <= 0:
            raise ValueError(f"ReviewKD: max_mid_channels must be positive, got {max_mid_channels}")
        self.max_mid_channels = int(max_mid_channels)
        self.levels = tuple(int(v) for v in levels)
        self.abfs = nn.ModuleList()
        self.out_sizes: list[tuple[int, int]] = []

    def _pairs(self, student: Shapes, teacher: Shapes) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        s_list, t_list = as_shape_list(student), as_shape_list(teacher)
        if len(s_list) == 0 or len(s_list) != len(t_list):
            raise ValueError(f"ReviewKD: 'student' and 'teacher' must list the same number of features (at least "
                             f"one), got {len(s_list)} student shapes {s_list} and {len(t_list)} teacher shapes {t_list}")
        pairs = []
        for i, (s, t) in enumerate(zip(s_list, t_list)):
            if len(s) not in (2, 4) or len(t) not in (2, 4) or s[0] != t[0]:
                raise ValueError(f"ReviewKD: pair {i} must be (batch, channels[, height, width]) features with the same "
                                 f"batch size, got 'student' {s} and 'teacher' {t}")
            pairs.append((_map_shape(s), _map_shape(t)))
        return pairs

    def setup(self, ctx: BuildContext) -> None:
        """One ABF per stage (student channels -> mid -> teacher channels, at the teacher's size)."""
        shapes = ctx.shapes
        pairs = self._pairs(shapes["student"], shapes["teacher"])
        mid = min(self.max_mid_channels, pairs[-1][0][1])
        last = len(pairs) - 1
        self.abfs = nn.ModuleList([ABF(s[1], mid, t[1], fuse=i < last) for i, (s, t) in enumerate(pairs)])
        self.out_sizes = [(t[2], t[3]) for _, t in pairs]

    def check_shapes(self, student: Shapes, teacher: Shapes) -> None:  # type: ignore[override]
        pairs = self._pairs(student, teacher)
        if len(self.abfs) and len(self.abfs) != len(pairs):
            raise ValueError(f"ReviewKD: set up for {len(self.abfs)} stages, got {len(pairs)}")
        for i, ((s, t), abf) in enumerate(zip(pairs, self.abfs)):
            c_in, c_out = abf.conv1[0].in_channels, abf.conv2[0].out_channels
            if (c_in, c_out) != (s[1], t[1]) or self.out_sizes[i] != (t[2], t[3]):
                raise ValueError(f"ReviewKD: stage {i} was set up for {c_in} student channels and a teacher map of "
                                 f"{c_out} x {self.out_sizes[i]}, got 'student' {s} and 'teacher' {t}")

    def review(self, student: Sequence[Tensor]) -> list[Tensor]:
        """The ABF outputs, shallow to deep (each at its teacher feature's shape)."""
        outs: list[Tensor] = [None] * len(student)  # type: ignore[list-item]
        residual = None
        for i in range(len(student) - 1, -1, -1):
            outs[i], residual = self.abfs[i](student[i], residual, self.out_sizes[i])
        return outs

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:  # type: ignore[override]
        if not len(self.abfs):
            raise RuntimeError("ReviewKD: the ABF modules do not exist yet: call setup(ctx) first")
        s_list, t_list = as_tensor_list(student), as_tensor_list(teacher)
        if len(s_list) != len(self.abfs) or len(t_list) != len(self.abfs):
            raise ValueError(f"ReviewKD: set up for {len(self.abfs)} stages, got {len(s_list)} student and "
                             f"{len(t_list)} teacher features")
        with full_precision(s_list[0]):
            s_maps = [_as_map(to_float(s)) for s in s_list]
            t_maps = [_as_map(to_float(t)).detach() for t in t_list]
            return hcl_loss(self.review(s_maps), t_maps, self.levels)


__all__ = ["ABF", "ReviewKDLoss", "hcl_loss"]
