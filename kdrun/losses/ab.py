"""Activation-boundary distillation (AB), with its connectors."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kdrun.component import BuildContext
from kdrun.losses.base import LossTerm
from kdrun.losses.features import Features, Shapes, full_precision, paired_shapes, paired_tensors
from kdrun.models.adapters import ConvRegressor


def ab_alternative_l2(source: Tensor, target: Tensor, margin: float) -> Tensor:
    """Element-wise alternative L2 of AB: ``relu(margin + s)^2`` where the teacher neuron is off
    (``t <= 0``), ``relu(margin - s)^2`` where it is on (``t > 0``)."""
    on = target > 0
    return torch.where(on, (margin - source).clamp(min=0), (margin + source).clamp(min=0)).pow(2)


class ABLoss(LossTerm):
    """Activation-boundary distillation, Heo, Lee, Yun & Choi, "Knowledge Transfer via Distillation of
    Activation Boundaries Formed by Hidden Neurons", AAAI 2019.

    AB transfers *where* the teacher's neurons switch on: for every pre-ReLU response ``t`` of the teacher
    and the student's response ``r(s)`` mapped by a connector ``r``, the alternative (hinge-squared) loss
    ``relu(mu - r(s))^2`` pushes the student above ``+mu`` where the teacher is active (``t > 0``) and
    ``relu(mu + r(s))^2`` below ``-mu`` where it is not (``t <= 0``), with margin ``mu`` = 1. Per stage pair
    ``i`` (of K) the term sums that over channels and positions, divides by the batch size and weights it
    by ``w_i`` (default ``2^(i - K + 1)``: 1 for the last stage, halving toward the input) and by
    ``scale`` (default 3e-3); it returns the sum over pairs. It is 0 when the connected student responses
    lie beyond the margin on the teacher's side of every boundary.

    Connectors (created in :meth:`setup`, trained with the student): identity where the student's map
    has the teacher's channels and size, otherwise conv + BN without ReLU
    (:class:`~kdrun.models.adapters.ConvRegressor` with ``use_relu=False``), as RepDistiller's
    ``Connector``. (The official AB code uses 1x1 conv + BN connectors; RepDistiller picks the conv from
    the spatial sizes, which for equal sizes is the same 1x1 conv, here with a bias.)

    Same formula and constants as RepDistiller's ``ABLoss`` (``w_i``, ``/ batch``, ``* 3 / 1000``, the code
    behind the CRD paper's table); the official AB code uses the same loss with ``/ 1000`` and weights
    ``1, 1/2, 1/4, 1/8`` from the last stage down.

    Stages: AB is an *initialisation*. In the CRD table (RepDistiller ``--distill abound``) a first stage of
    30 epochs trains the student's feature layers and the connectors with this loss alone (SGD, lr 0.05 --
    0.01 for MobileNetV2/ShuffleNet students --, momentum 0.9, weight decay 5e-4, no schedule, no
    cross-entropy); then the main stage of 240 epochs trains with cross-entropy only (RepDistiller's
    ``-b 1`` multiplies a zero AB term there; the connectors are unused). So list this term in the init
    stage only (``train: [student]``; the classifier gets no gradient from it and stays untouched). The
    paper's own recipe is the same two-step scheme (initialisation, then classification training).

    Args:
        margin: ``mu`` (default 1.0).
        scale: overall factor (default 0.003, RepDistiller's ``/ 1000 * 3``).
        stage_weights: ``w_i`` per pair, shallow to deep; ``None`` (default): ``2^(i - K + 1)``.

    Inputs: ``student``, ``teacher``: equal-length lists of **pre-activation** (B, C, H, W) maps
    (``stage1_pre``..``stageK_pre``; RepDistiller's ``feat[1:-1]`` with ``preact=True``). The connectors need
    the student's map to be twice, half or at least the teacher's size (see ``ConvRegressor``).
    """

    def __init__(self, margin: float = 1.0, scale: float = 3e-3, stage_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"AB: margin must be non-negative, got {margin}")
        self.margin = float(margin)
        self.scale = float(scale)
        self.stage_weights = None if stage_weights is None else [float(w) for w in stage_weights]
        self.connectors = nn.ModuleList()

    def setup(self, ctx: BuildContext) -> None:
        """One connector per stage pair: identity for equal shapes, else conv + BN to the teacher's shape."""
        shapes = ctx.shapes
        pairs = self._pairs(shapes["student"], shapes["teacher"])
        self.connectors = nn.ModuleList()
        for s, t in pairs:
            if s[1:] == t[1:]:
                self.connectors.append(nn.Identity())
            else:
                try:
                    self.connectors.append(ConvRegressor(s[1], t[1], in_size=tuple(s[2:]), out_size=tuple(t[2:]),
                                                         use_relu=False))
                except ValueError as ex:
                    raise ValueError(f"AB: no connector maps 'student' {s} onto 'teacher' {t}: {ex}") from None

    def _pairs(self, student: Shapes, teacher: Shapes) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        pairs = paired_shapes("AB", student, teacher, ndim=4)
        if self.stage_weights is not None and len(self.stage_weights) != len(pairs):
            raise ValueError(f"AB: {len(self.stage_weights)} stage_weights for {len(pairs)} stage pairs")
        return pairs

    def check_shapes(self, student: Shapes, teacher: Shapes) -> None:  # type: ignore[override]
        pairs = self._pairs(student, teacher)
        for i, (s, t) in enumerate(pairs):
            if s[1:] != t[1:]:
                ok_h = s[2] == 2 * t[2] or 2 * s[2] == t[2] or s[2] >= t[2]
                ok_w = s[3] == 2 * t[3] or 2 * s[3] == t[3] or s[3] >= t[3]
                if not (ok_h and ok_w):
                    raise ValueError(f"AB: pair {i}: no connector maps 'student' {s} onto 'teacher' {t} (the student "
                                     f"map must be twice, half or at least the teacher's size)")
        if len(self.connectors) and len(self.connectors) != len(pairs):
            raise ValueError(f"AB: set up for {len(self.connectors)} stage pairs, got {len(pairs)}")

    def weights(self, k: int) -> list[float]:
        """``w_i`` of K pairs, shallow to deep."""
        return list(self.stage_weights) if self.stage_weights is not None else [2.0 ** (i - k + 1) for i in range(k)]

    def forward(self, student: Features, teacher: Features) -> Tensor:  # type: ignore[override]
        if not len(self.connectors):
            raise RuntimeError("AB: the connectors do not exist yet: call setup(ctx) first")
        pairs = paired_tensors("AB", student, teacher)
        if len(pairs) != len(self.connectors):
            raise ValueError(f"AB: set up for {len(self.connectors)} stage pairs, got {len(pairs)}")
        with full_precision(pairs[0][0]):
            total = None
            for (fs, ft), conn, w in zip(pairs, self.connectors, self.weights(len(pairs))):
                loss = ab_alternative_l2(conn(fs), ft.detach(), self.margin).sum() / fs.shape[0] * (w * self.scale)
                total = loss if total is None else total + loss
        return total


__all__ = ["ABLoss", "ab_alternative_l2"]
