"""Variational information distillation (VID), with its regressors and learned variances."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext
from kdrun.losses.base import LossTerm
from kdrun.losses.features import Features, Shapes, full_precision, match_spatial, paired_shapes, paired_tensors


class VIDRegressor(nn.Module):
    """The mean ``mu(s)`` of VID's Gaussian: three 1x1 convolutions without bias, ReLU between them
    (``in -> mid -> mid -> out``), as RepDistiller's (and the VID authors') regressor."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False),
            nn.ReLU(),
            nn.Conv2d(mid_channels, out_channels, kernel_size=1, bias=False),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _inverse_softplus(y: float) -> float:
    """``x`` with ``log(1 + exp(x)) = y`` (y > 0)."""
    return y + math.log(-math.expm1(-y))


class VIDLoss(LossTerm):
    """Variational information distillation, Ahn et al., "Variational Information Distillation for
    Knowledge Transfer", CVPR 2019.

    VID maximises a variational lower bound of the mutual information between teacher and student
    features by fitting a Gaussian ``q(t | s) = N(mu(s), sigma^2)`` to the teacher's feature map given the
    student's: ``mu`` is a small trainable regressor (three 1x1 convolutions) on the student's map, and
    ``sigma_c^2 = softplus(alpha_c) + eps`` a trainable variance per teacher channel (shared over positions,
    the paper's "heteroscedastic over channels" choice for intermediate layers). The loss per stage pair
    is the Gaussian negative log-likelihood (without the constant ``log(2 pi) / 2``), averaged over batch,
    channels and positions::

        L = mean_{b,c,h,w} 0.5 * ( (mu(s)_bchw - t_bchw)^2 / sigma_c^2 + log sigma_c^2 )

    and the term sums the pairs. Where the maps' spatial sizes differ the larger one is
    adaptive-average-pooled to the smaller (before the regressor). For a fixed regressor the loss is
    smallest at ``sigma_c^2 = mean_{b,h,w} (mu - t)^2``; it is not zero when student equals teacher.
    The teacher gets no gradient; the regressors and variances train with the student.

    Same as RepDistiller's ``VIDLoss`` (the VID authors' code), with one regressor and variance per pair
    created in :meth:`setup` from the input shapes.

    Args:
        mid_channels: width of the regressor's hidden layers; ``None`` (default) uses the teacher's
            channel count of each pair, as RepDistiller (``VIDLoss(s, t, t)``).
        init_pred_var: initial variance ``sigma^2`` (default 5.0).
        eps: the variance floor ``eps`` (default 1e-5).

    CIFAR-100 table of the CRD paper (RepDistiller ``--distill vid -a 0 -b 1``): weight 1 on the outputs of
    every stage (``stage1``..``stageK``, RepDistiller's ``feat[1:-1]``), cross-entropy weight 1, no KD term.
    Inputs: ``student``, ``teacher``: tensors or equal-length lists of (B, C, H, W) maps.
    """

    def __init__(self, mid_channels: int | None = None, init_pred_var: float = 5.0, eps: float = 1e-5) -> None:
        super().__init__()
        if mid_channels is not None and mid_channels <= 0:
            raise ValueError(f"VID: mid_channels must be positive or None, got {mid_channels}")
        if eps < 0 or init_pred_var <= eps:
            raise ValueError(f"VID: need init_pred_var > eps >= 0, got init_pred_var={init_pred_var}, eps={eps}")
        self.mid_channels = None if mid_channels is None else int(mid_channels)
        self.init_pred_var = float(init_pred_var)
        self.eps = float(eps)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()

    def setup(self, ctx: BuildContext) -> None:
        """One regressor and one variance vector per stage pair."""
        shapes = ctx.shapes
        pairs = paired_shapes("VID", shapes["student"], shapes["teacher"], ndim=4)
        self.regressors = nn.ModuleList()
        self.log_scales = nn.ParameterList()
        alpha = _inverse_softplus(self.init_pred_var - self.eps)
        for s, t in pairs:
            mid = self.mid_channels if self.mid_channels is not None else t[1]
            self.regressors.append(VIDRegressor(s[1], mid, t[1]))
            self.log_scales.append(nn.Parameter(torch.full((t[1],), alpha)))

    def check_shapes(self, student: Shapes, teacher: Shapes) -> None:  # type: ignore[override]
        pairs = paired_shapes("VID", student, teacher, ndim=4)
        if len(self.regressors) and len(self.regressors) != len(pairs):
            raise ValueError(f"VID: set up for {len(self.regressors)} stage pairs, got {len(pairs)}")
        for i, ((s, t), reg) in enumerate(zip(pairs, self.regressors)):
            first, last = reg.net[0], reg.net[-1]
            if first.in_channels != s[1] or last.out_channels != t[1]:
                raise ValueError(f"VID: pair {i} was set up for {first.in_channels} student and {last.out_channels} "
                                 f"teacher channels, got 'student' {s} and 'teacher' {t}")

    def variances(self) -> list[Tensor]:
        """``sigma_c^2`` of every pair."""
        return [F.softplus(a) + self.eps for a in self.log_scales]

    def forward(self, student: Features, teacher: Features) -> Tensor:  # type: ignore[override]
        if not len(self.regressors):
            raise RuntimeError("VID: the regressors do not exist yet: call setup(ctx) first")
        pairs = paired_tensors("VID", student, teacher)
        if len(pairs) != len(self.regressors):
            raise ValueError(f"VID: set up for {len(self.regressors)} stage pairs, got {len(pairs)}")
        with full_precision(pairs[0][0]):
            total = None
            for (fs, ft), reg, var in zip(pairs, self.regressors, self.variances()):
                fs, ft = match_spatial(fs, ft.detach())
                mu = reg(fs)
                var = var.view(1, -1, 1, 1)
                loss = (0.5 * ((mu - ft).pow(2) / var + torch.log(var))).mean()
                total = loss if total is None else total + loss
        return total


__all__ = ["VIDLoss", "VIDRegressor"]
