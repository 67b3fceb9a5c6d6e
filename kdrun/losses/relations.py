"""Loss terms that transfer relations between the samples of a batch: SP, CC, RKD, PKT.

They compare B x B (or B x B x B) structures computed within the student's batch and within the
teacher's, so student and teacher features may have different widths. Every input is flattened to
(B, -1) where the method works on vectors. Arithmetic runs in float32 with autocast off (see
:mod:`kdrun.losses.features`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.component import BuildContext
from kdrun.losses.base import LossTerm
from kdrun.losses.features import Features, Shapes, full_precision, paired_shapes, paired_tensors, to_float
from kdrun.models.adapters import LinearEmbed


def _same_batch(term: str, student: torch.Size, teacher: torch.Size) -> None:
    if len(student) < 2 or len(teacher) < 2 or student[0] != teacher[0]:
        raise ValueError(
            f"{term}: 'student' {tuple(student)} and 'teacher' {tuple(teacher)} must be (batch, ...) tensors "
            f"with the same batch size"
        )


# ----------------------------------------------------------------------------- SP
class SPLoss(LossTerm):
    """Similarity-preserving KD, Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019.

    With ``f`` the (B, -1) flattened features, ``G = f f^T`` is the B x B matrix of pairwise
    similarities within the batch; each row is L2-normalised. ``L = ||G_t - G_s||_F^2 / B^2``; the
    term sums over stage pairs when given lists. Invariant to rescaling either model's features.

    Same as RepDistiller's ``Similarity`` (checked by the paper's first author, per its README).

    CIFAR-100 table of the CRD paper: weight 3000 on the output of the last stage (RepDistiller's
    ``feat[-2]``: ``stageK``, the map before pooling), cross-entropy weight 1, no KD term.
    Inputs: ``student``, ``teacher``: tensors or equal-length lists of (B, ...) tensors.
    """

    def check_shapes(self, student: Shapes, teacher: Shapes) -> None:  # type: ignore[override]
        paired_shapes("SP", student, teacher)

    @staticmethod
    def similarity(f: Tensor) -> Tensor:
        """Row-normalised (B, B) Gram matrix of the flattened features."""
        f = f.flatten(1)
        return F.normalize(f @ f.t(), dim=1)

    def forward(self, student: Features, teacher: Features) -> Tensor:  # type: ignore[override]
        pairs = paired_tensors("SP", student, teacher)
        with full_precision(pairs[0][0]):
            total = None
            for fs, ft in pairs:
                b = fs.shape[0]
                loss = (self.similarity(ft) - self.similarity(fs)).pow(2).sum() / (b * b)
                total = loss if total is None else total + loss
        return total


# ----------------------------------------------------------------------------- CC
class CCLoss(LossTerm):
    """Correlation congruence, Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019,
    as implemented in RepDistiller (the code behind the CRD paper's CIFAR-100 table).

    What RepDistiller computes (its ``Correlation``, code the CC authors sent to the CRD authors):
    student and teacher features go through trainable linear embedding heads ``e_s``, ``e_t``
    (to ``embed_dim`` = 128, no normalisation; both heads train with the student), then with
    ``delta_i = |e_s(s_i) - e_t(t_i)|`` (element-wise) the loss couples *consecutive* samples of the
    batch: ``L = 1/(B-1) * sum_{i<B-1} sum_d delta_{i,d} * delta_{i+1,d}``. It depends on the batch
    order (a shuffled batch makes the pairs random) and is 0 for a batch of one.

    How it differs from the paper: the paper builds, per model, the B x B correlation matrix
    ``C_ij = k(f_i, f_j)`` with a Gaussian RBF kernel approximated by a truncated Taylor series, and
    minimises ``||C_t - C_s||_F^2 / B^2``, with a class-aware mini-batch sampler. No such matrix,
    kernel or sampling exists in the RepDistiller version, which is what this term computes.

    Args:
        embed_dim: size of the embedding heads, created in :meth:`setup` from the input widths
            (default 128, as RepDistiller's ``feat_dim``). ``None``: no heads; the flattened student
            and teacher features are used directly and must have the same width.

    CIFAR-100 table of the CRD paper: weight 0.02 on the pooled features (``feat``), embedding 128,
    cross-entropy weight 1, no KD term. Inputs: ``student``, ``teacher``: (B, D) (or (B, ...), flattened).
    """

    def __init__(self, embed_dim: int | None = 128) -> None:
        super().__init__()
        if embed_dim is not None and embed_dim <= 0:
            raise ValueError(f"CC: embed_dim must be positive or None, got {embed_dim}")
        self.embed_dim = None if embed_dim is None else int(embed_dim)
        self.embed_s: LinearEmbed | None = None
        self.embed_t: LinearEmbed | None = None

    def setup(self, ctx: BuildContext) -> None:
        shapes = ctx.shapes
        if self.embed_dim is None:
            return
        ds = math.prod(tuple(shapes["student"])[1:])
        dt = math.prod(tuple(shapes["teacher"])[1:])
        self.embed_s = LinearEmbed(ds, self.embed_dim)
        self.embed_t = LinearEmbed(dt, self.embed_dim)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        _same_batch("CC", student, teacher)
        ds, dt = math.prod(tuple(student)[1:]), math.prod(tuple(teacher)[1:])
        if self.embed_dim is None and ds != dt:
            raise ValueError(
                f"CC: without embedding heads (embed_dim=None) 'student' {tuple(student)} and 'teacher' "
                f"{tuple(teacher)} must have the same width; set embed_dim to add heads"
            )
        for name, head, d in (("student", self.embed_s, ds), ("teacher", self.embed_t, dt)):
            if head is not None and head.linear.in_features != d:
                raise ValueError(
                    f"CC: the {name} embedding head takes {head.linear.in_features} features but '{name}' "
                    f"has shape {tuple(student if name == 'student' else teacher)}"
                )

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        if self.embed_dim is not None and (self.embed_s is None or self.embed_t is None):
            raise RuntimeError("CC: the embedding heads do not exist yet: call setup(ctx) first")
        with full_precision(student):
            s, t = to_float(student).flatten(1), to_float(teacher).flatten(1)
            if self.embed_s is not None and self.embed_t is not None:
                s, t = self.embed_s(s), self.embed_t(t)
            delta = (s - t).abs()
            if delta.shape[0] < 2:
                return delta.sum() * 0.0
            return (delta[:-1] * delta[1:]).sum(dim=1).mean()


# ----------------------------------------------------------------------------- RKD
def pairwise_distances(e: Tensor, eps: float = 1e-12) -> Tensor:
    """(B, D) -> (B, B) Euclidean distances; squared distances are clamped at ``eps`` before the
    square root (no infinite gradient at 0) and the diagonal is exactly 0."""
    sq = (e * e).sum(dim=1)
    d2 = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp(min=eps)
    eye = torch.eye(e.shape[0], dtype=torch.bool, device=e.device)
    return d2.sqrt().masked_fill(eye, 0.0)


def _mean_normalised(d: Tensor, eps: float) -> Tensor:
    """``d / mean(d[d > 0])`` without data-dependent indexing (no host sync)."""
    pos = d > 0
    mean = (d * pos).sum() / pos.sum().clamp(min=1)
    return d / mean.clamp(min=eps)


def triplet_angles(e: Tensor) -> Tensor:
    """(B, D) -> (B, B, B): ``[j, i, k] = cos of the angle at e_j between e_i - e_j and e_k - e_j``
    (0 where a difference vector is 0)."""
    diff = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # diff[j, i] = (e_i - e_j) / |.|
    return torch.bmm(diff, diff.transpose(1, 2))


class RKDLoss(LossTerm):
    """Relational KD, Park et al., "Relational Knowledge Distillation", CVPR 2019.

    On (B, D) features (flattened):
    - distance-wise: pairwise Euclidean distances, each model's divided by the mean of its nonzero
      distances; Huber (smooth L1, threshold 1) between student and teacher, averaged over the B^2 pairs;
    - angle-wise: for every triplet (i, j, k), the cosine of the angle at ``e_j`` between ``e_i - e_j``
      and ``e_k - e_j``; smooth L1 averaged over the B^3 triplets.
    Returns ``{"distance": distance_weight * L_d, "angle": angle_weight * L_a}``. Both parts are
    invariant to rescaling either model's features. Squared distances are clamped at ``eps`` before
    the square root, as in the reference code, so identical samples give finite gradients.

    Same as RepDistiller's ``RKDLoss`` (itself the authors' formulation), with the mean over nonzero
    distances computed without boolean indexing.

    Args:
        distance_weight: weight of the distance part (default 25). angle_weight: of the angle part
            (default 50). eps: clamp of squared distances (default 1e-12).

    CIFAR-100 table of the CRD paper: term weight 1 (with the 25 / 50 inside) on the pooled features
    (``feat``), cross-entropy weight 1, no KD term. Inputs: ``student``, ``teacher``.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0, eps: float = 1e-12) -> None:
        super().__init__()
        self.distance_weight = float(distance_weight)
        self.angle_weight = float(angle_weight)
        self.eps = float(eps)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        _same_batch("RKD", student, teacher)

    def forward(self, student: Tensor, teacher: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        with full_precision(student):
            s, t = to_float(student).flatten(1), to_float(teacher).flatten(1)
            ds = _mean_normalised(pairwise_distances(s, self.eps), self.eps)
            dt = _mean_normalised(pairwise_distances(t, self.eps), self.eps)
            loss_d = F.smooth_l1_loss(ds, dt)
            loss_a = F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
        return {"distance": self.distance_weight * loss_d, "angle": self.angle_weight * loss_a}


# ----------------------------------------------------------------------------- PKT
class PKTLoss(LossTerm):
    """Probabilistic knowledge transfer, Passalis & Tefas, "Learning Deep Representations with
    Probabilistic Knowledge Transfer", ECCV 2018.

    Each model's (B, D) features are L2-normalised (``f / (||f|| + eps)``); the cosine similarities
    ``K_ij`` are mapped to [0, 1] by ``(K + 1) / 2`` and each row is divided by its sum, giving the
    conditional probabilities ``p_{j|i}``. The loss is the KL divergence from the teacher's to the
    student's conditional distributions, ``mean_{i,j} p^t_{j|i} log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))``
    (averaged over all B^2 entries, i.e. the per-row KL divided by B). Zero when the student's
    features equal the teacher's; invariant to rescaling either.

    Same as RepDistiller's ``PKT`` (the authors' cosine-kernel code, eps = 1e-7), minus its
    replacement of NaN features by 0 (the norm here is safe at 0).

    Args:
        eps: the 1e-7 above.

    CIFAR-100 table of the CRD paper: weight 30000 on the pooled features (``feat``), cross-entropy
    weight 1, no KD term. Inputs: ``student``, ``teacher``: (B, D) (or (B, ...), flattened).
    """

    def __init__(self, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = float(eps)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        _same_batch("PKT", student, teacher)

    def conditional_probabilities(self, f: Tensor) -> Tensor:
        f = f.flatten(1)
        f = f / (torch.linalg.vector_norm(f, dim=1, keepdim=True) + self.eps)
        k = (f @ f.t() + 1.0) / 2.0
        return k / k.sum(dim=1, keepdim=True)

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        with full_precision(student):
            ps = self.conditional_probabilities(to_float(student))
            pt = self.conditional_probabilities(to_float(teacher))
            return (pt * torch.log((pt + self.eps) / (ps + self.eps))).mean()


__all__ = ["SPLoss", "CCLoss", "RKDLoss", "PKTLoss", "pairwise_distances", "triplet_angles"]
