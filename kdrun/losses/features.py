"""Loss terms that read intermediate feature maps: FitNets, AT, NST, FSP.

Terms that compare several stages (AT, NST, FSP) take ``student`` and ``teacher`` either as single
tensors or as equal-length lists of tensors, one per stage, e.g.::

    inputs: {student: [student.stage1, student.stage2, student.stage3],
             teacher: [teacher.stage1, teacher.stage2, teacher.stage3]}

All arithmetic runs in float32 (bf16/fp16 inputs are upcast, autocast is switched off inside the
term): Gram matrices and normalisations of low-precision features are too coarse for these losses.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.losses.base import LossTerm, require_same_shape

Features = Union[Tensor, Sequence[Tensor]]
Shapes = Union[torch.Size, Sequence[torch.Size]]


# ----------------------------------------------------------------------------- shared helpers
def full_precision(x: Tensor) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``x``'s device (a no-op where autocast does not exist)."""
    dev = x.device.type
    available = getattr(torch.amp, "is_autocast_available", None)
    ok = available(dev) if available is not None else dev in ("cpu", "cuda")
    return torch.autocast(device_type=dev, enabled=False) if ok else contextlib.nullcontext()


def to_float(x: Tensor) -> Tensor:
    """``x`` in float32 (float64 is kept)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def as_tensor_list(x: Features) -> list[Tensor]:
    """A tensor -> ``[tensor]``; a sequence of tensors -> a list."""
    return [x] if isinstance(x, Tensor) else list(x)


def as_shape_list(x: Shapes) -> list[tuple[int, ...]]:
    """A shape -> ``[shape]``; a sequence of shapes -> a list of tuples."""
    if isinstance(x, (torch.Size, tuple)) and all(isinstance(v, int) for v in x):
        return [tuple(x)]
    return [tuple(s) for s in x]


def paired_shapes(term: str, student: Shapes, teacher: Shapes, ndim: int | None = None) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Check that student/teacher shape lists pair up (same length, same batch, ``ndim`` dims)."""
    s_list, t_list = as_shape_list(student), as_shape_list(teacher)
    if len(s_list) == 0 or len(s_list) != len(t_list):
        raise ValueError(
            f"{term}: 'student' and 'teacher' must list the same number of tensors (at least one), got "
            f"{len(s_list)} student shapes {s_list} and {len(t_list)} teacher shapes {t_list}"
        )
    for i, (s, t) in enumerate(zip(s_list, t_list)):
        if ndim is not None and (len(s) != ndim or len(t) != ndim):
            raise ValueError(
                f"{term}: pair {i} must be {ndim}-D (batch, channels, height, width) feature maps, got "
                f"'student' {s} and 'teacher' {t}"
            )
        if len(s) == 0 or len(t) == 0 or s[0] != t[0]:
            raise ValueError(f"{term}: pair {i} has different batch sizes: 'student' {s} and 'teacher' {t}")
    return list(zip(s_list, t_list))


def paired_tensors(term: str, student: Features, teacher: Features) -> list[tuple[Tensor, Tensor]]:
    """Pair up student/teacher tensors (one pair for single tensors), in float32."""
    s_list, t_list = as_tensor_list(student), as_tensor_list(teacher)
    if len(s_list) == 0 or len(s_list) != len(t_list):
        raise ValueError(f"{term}: got {len(s_list)} student tensors and {len(t_list)} teacher tensors")
    return [(to_float(s), to_float(t)) for s, t in zip(s_list, t_list)]


def match_spatial(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever map is larger down to the smaller spatial size (per dimension)."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


# ----------------------------------------------------------------------------- FitNets
class HintLoss(LossTerm):
    """FitNets' hint loss, Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015.

    ``L = mean((r(s) - t)^2)`` over all elements: the mean squared error between the student's guided
    layer, mapped by a regressor ``r``, and the teacher's hint layer. The regressor is an adapter
    (:class:`kdrun.models.adapters.ConvRegressor`), so ``student`` here is the regressed map and must
    have the teacher's shape.

    CIFAR-100 table of the CRD paper (RepDistiller ``--distill hint``): hint on the output of the
    second stage (``stage2``; RepDistiller's ``hint_layer=2``) through a ConvRegressor, weight 100,
    cross-entropy weight 1, no KD term. RepDistiller trains the regressor jointly with the student in
    one stage; the paper's FitNets first pre-trains the student's lower layers on the hint alone and
    then runs KD (stage-wise training). Inputs: ``student`` (regressed map), ``teacher``.
    """

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("FitNets hint", "student", student, "teacher", teacher)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        with full_precision(student):
            return F.mse_loss(to_float(student), to_float(teacher))


# ----------------------------------------------------------------------------- attention transfer
class ATLoss(LossTerm):
    """Attention transfer, Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017.

    For a feature map ``A`` (B, C, H, W) the spatial attention map is ``Q = mean_c |A_c|^p`` flattened
    to (B, H*W) and L2-normalised per sample. Per stage pair the loss is the mean over batch and
    positions of ``(Q_s - Q_t)^2``; the term sums the pairs. Where the two maps' spatial sizes
    differ, the larger one is adaptive-average-pooled to the smaller. Channel counts may differ.

    This is RepDistiller's formula (squared difference, ``.pow(2).mean()``), which the CRD table
    used; the paper writes the p-norm of the difference of the normalised maps.

    Args:
        p: exponent of the activation magnitudes (default 2).

    CIFAR-100 table of the CRD paper: weight 1000 on the outputs of every stage (RepDistiller's
    ``feat[1:-1]``: ``stage1``..``stageK``, not the stem nor the pooled feature), cross-entropy weight 1,
    no KD term. Inputs: ``student``, ``teacher``: tensors or equal-length lists of (B, C, H, W) maps.
    """

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        if p <= 0:
            raise ValueError(f"AT: p must be positive, got {p}")
        self.p = float(p)

    def check_shapes(self, student: Shapes, teacher: Shapes) -> None:  # type: ignore[override]
        paired_shapes("AT", student, teacher, ndim=4)

    def attention(self, f: Tensor) -> Tensor:
        """(B, C, H, W) -> L2-normalised (B, H*W) attention map."""
        return F.normalize(f.abs().pow(self.p).mean(dim=1).flatten(1), dim=1)

    def forward(self, student: Features, teacher: Features) -> Tensor:  # type: ignore[override]
        pairs = paired_tensors("AT", student, teacher)
        with full_precision(pairs[0][0]):
            total = None
            for fs, ft in pairs:
                fs, ft = match_spatial(fs, ft)
                loss = (self.attention(fs) - self.attention(ft)).pow(2).mean()
                total = loss if total is None else total + loss
        return total


# ----------------------------------------------------------------------------- NST
class NSTLoss(LossTerm):
    """Neuron selectivity transfer, Huang & Wang, "Like What You Like: Knowledge Distill via Neuron
    Selectivity Transfer", arXiv 2017.

    Each channel of a feature map is a sample of a distribution over spatial positions: flatten to
    (B, C, H*W) and L2-normalise every channel over positions. The loss is the squared maximum mean
    discrepancy between the student's and the teacher's channel sets, per image, with the polynomial
    kernel ``k(x, y) = (x . y)^2`` (d = 2, c = 0):
    ``MMD^2 = mean k(t, t') + mean k(s, s') - 2 mean k(s, t)``, means over channel pairs and the batch.
    Where spatial sizes differ the larger map is pooled to the smaller; channel counts may differ.
    The teacher-teacher term is a constant (detached). The term sums over stage pairs.

    Same as RepDistiller's ``NSTLoss`` (full MMD, polynomial kernel), computed with batched matrix
    products instead of broadcasting.

    CIFAR-100 table of the CRD paper: weight 50 on ``stage1``..``stageK`` outputs (RepDistiller's
    ``feat[1:-1]``), cross-entropy weight 1, no KD term. Inputs: ``student``, ``teacher``: tensors or
    equal-length lists of (B, C, H, W) maps.
    """

    def check_shapes(self, student: Shapes, teacher: Shapes) -> None:  # type: ignore[override]
        paired_shapes("NST", student, teacher, ndim=4)

    @staticmethod
    def _poly_mean(a: Tensor, b: Tensor) -> Tensor:
        return torch.bmm(a, b.transpose(1, 2)).pow(2).mean()

    def forward(self, student: Features, teacher: Features) -> Tensor:  # type: ignore[override]
        pairs = paired_tensors("NST", student, teacher)
        with full_precision(pairs[0][0]):
            total = None
            for fs, ft in pairs:
                fs, ft = match_spatial(fs, ft)
                fs = F.normalize(fs.flatten(2), dim=2)
                ft = F.normalize(ft.flatten(2), dim=2)
                loss = (self._poly_mean(ft, ft).detach() + self._poly_mean(fs, fs)
                        - 2.0 * self._poly_mean(fs, ft))
                total = loss if total is None else total + loss
        return total


# ----------------------------------------------------------------------------- FSP
class FSPLoss(LossTerm):
    """Flow of solution procedure, Yim et al., "A Gift from Knowledge Distillation: Fast Optimization,
    Network Minimization and Transfer Learning", CVPR 2017.

    For consecutive feature maps ``F1`` (B, C1, H, W) and ``F2`` (B, C2, H, W) of one network, the FSP
    matrix is ``G[b, j, i] = mean_{h,w} F2[b, j, h, w] * F1[b, i, h, w]`` (B, C2, C1); where the two maps
    differ in spatial size the larger is adaptive-average-pooled to the smaller. The loss is the mean
    squared difference between the student's and the teacher's FSP matrices, summed over the
    consecutive pairs. Student and teacher must have the same channel count stage by stage (their
    spatial sizes may differ).

    RepDistiller's ``FSP`` (the CRD table) averages the squared difference over batch and matrix
    entries; the paper sums over entries and averages over the batch, with per-pair weights.

    CIFAR-100 table of the CRD paper: FSP only drives a first stage of 30 epochs that trains the
    student's feature layers (no classifier, no cross-entropy) with weight 1 on
    ``[stem, stage1, .., stageK]`` (RepDistiller's ``feat[:-1]``), SGD at the main learning rate;
    then a second stage of 240 epochs trains with cross-entropy only (RepDistiller's ``-b 50`` has no
    effect there). It needs equal channel counts, so the table's FSP cell for wrn-40-2 -> wrn-40-1 is
    empty (0.00) and it has no FSP row for teacher/student pairs of different architectures.
    Inputs: ``student``, ``teacher``: equal-length lists of at least 2 (B, C, H, W) maps.
    """

    def check_shapes(self, student: Shapes, teacher: Shapes) -> None:  # type: ignore[override]
        pairs = paired_shapes("FSP", student, teacher, ndim=4)
        if len(pairs) < 2:
            raise ValueError(f"FSP: needs at least 2 consecutive feature maps per model, got {len(pairs)}")
        for i, (s, t) in enumerate(pairs):
            if s[1] != t[1]:
                raise ValueError(
                    f"FSP: map {i} has {s[1]} student channels ('student' {s}) but {t[1]} teacher channels "
                    f"('teacher' {t}); FSP matrices need equal channel counts at every stage"
                )

    @staticmethod
    def fsp_matrices(feats: list[Tensor]) -> list[Tensor]:
        """FSP (B, C_{k+1}, C_k) matrices of consecutive maps."""
        out = []
        for low, high in zip(feats[:-1], feats[1:]):
            low, high = match_spatial(low, high)
            hw = low.shape[-2] * low.shape[-1]
            out.append(torch.bmm(high.flatten(2), low.flatten(2).transpose(1, 2)) / hw)
        return out

    def forward(self, student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:  # type: ignore[override]
        pairs = paired_tensors("FSP", student, teacher)
        if len(pairs) < 2:
            raise ValueError(f"FSP: needs at least 2 consecutive feature maps per model, got {len(pairs)}")
        s_feats, t_feats = [p[0] for p in pairs], [p[1] for p in pairs]
        with full_precision(s_feats[0]):
            total = None
            for gs, gt in zip(self.fsp_matrices(s_feats), self.fsp_matrices(t_feats)):
                if gs.shape != gt.shape:
                    raise ValueError(f"FSP: student FSP matrix {tuple(gs.shape)} vs teacher {tuple(gt.shape)}: "
                                     f"channel counts differ")
                loss = (gs - gt).pow(2).mean()
                total = loss if total is None else total + loss
        return total


# ----------------------------------------------------------------------------- G2SD's feature loss
class SmoothL1FeatureLoss(LossTerm):
    """Smooth-L1 regression of normalised teacher features: G2SD's generic-stage loss (Huang et al.,
    "Generic-to-Specific Distillation of Masked Autoencoders", CVPR 2023; ``engine_distill.py``):

        ``L = mean_{i,n,c} smoothL1_beta(s_inc - LN(t)_inc)``,  ``smoothL1_beta(d) = d^2 / (2 beta)`` if
        ``|d| < beta`` else ``|d| - beta / 2``,

    with ``LN`` a LayerNorm over the channels without affine parameters (eps 1e-6) when
    ``normalize_target`` (default). ``student`` is the student's decoder tokens projected to the
    teacher's width (an ``MLPProjector`` adapter), ``teacher`` the teacher decoder's hidden tokens,
    both (B, 1 + N, C). By default every token is compared (G2SD's default ``supervise_all=True``);
    given ``mask`` (B, N) (``<model>.mask``, 1 = removed) only the removed patches' tokens are
    (``supervise_all=False``; every sample removes the same number, so the mean over them is the
    mean of per-sample means).

    Args: beta (2.0, G2SD's), normalize_target (True), eps (1e-6).
    """

    def __init__(self, beta: float = 2.0, normalize_target: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"smooth-L1 features: beta must be positive, got {beta}")
        self.beta, self.normalize_target, self.eps = float(beta), bool(normalize_target), float(eps)

    def check_shapes(self, student: torch.Size, teacher: torch.Size, mask: torch.Size | None = None) -> None:  # type: ignore[override]
        require_same_shape("smooth-L1 features", "student", student, "teacher", teacher)
        if mask is not None and (len(student) != 3 or tuple(mask) != (student[0], student[1] - 1)):
            raise ValueError(f"smooth-L1 features: 'mask' {tuple(mask)} must be (batch, tokens - 1) for the tokens "
                             f"{tuple(student)} (class token first)")

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:  # type: ignore[override]
        with full_precision(student):
            s, t = to_float(student), to_float(teacher)
            if self.normalize_target:
                t = F.layer_norm(t, t.shape[-1:], eps=self.eps)
            if mask is None:
                return F.smooth_l1_loss(s, t, beta=self.beta)
            per = F.smooth_l1_loss(s[:, 1:], t[:, 1:], beta=self.beta, reduction="none").mean(dim=-1)  # (B, N)
            m = mask.to(per.dtype)
            return (per * m).sum() / m.sum().clamp_min(1.0)
