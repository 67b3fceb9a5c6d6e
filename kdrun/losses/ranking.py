"""Ranking distillation on triples (:func:`kdrun.data.text.ranking_pairs`: each triple a (query, positive) and a
(query, negative) row, adjacent, ``positive`` saying which is which)."""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import LossTerm
from kdrun.losses.features import to_float


def margins(scores: Tensor, positive: Tensor) -> Tensor:
    """(pairs,) ``s(q, d+) - s(q, d-)`` from row scores (N,) or (N, 1) of adjacent pairs."""
    s = to_float(scores).reshape(scores.shape[0], -1)[:, 0]
    return torch.where(positive.bool(), s, -s).view(-1, 2).sum(dim=1)


def _check(term: str, student: torch.Size, teacher: torch.Size | None, positive: torch.Size) -> None:
    n = student[0]
    for name, shape in (("student", student), ("teacher", teacher)):
        if shape is not None and (shape[0] != n or (len(shape) == 2 and shape[1] != 1) or len(shape) > 2):
            raise ValueError(f"{term}: '{name}' must hold one score per row, (N,) or (N, 1), for {n} rows; got "
                             f"{tuple(shape)} (a cross-encoder teacher: a sequence classifier with num_classes 1)")
    if tuple(positive) != (n,) or n % 2:
        raise ValueError(f"{term}: 'positive' must be (N,) over an even number of rows (data=ranking_pairs), got "
                         f"{tuple(positive)} for {n} rows")


class MarginMSELoss(LossTerm):
    """Margin-MSE (Hofstatter et al., "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge
    Distillation", arXiv 2010.02666): ``(M_s - M_t)^2`` averaged over the triples, with ``M = s(q, d+) - s(q, d-)``
    the score margins of student and teacher. The teacher's scores come from a live cross-encoder
    (``teacher.logits``), from the triples file (``batch.teacher_score``) or from a score cache
    (``kdrun-cache --scores``: ``batch.cache_scores``)."""

    def check_shapes(self, student: torch.Size, teacher: torch.Size, positive: torch.Size) -> None:  # type: ignore[override]
        _check("Margin-MSE", student, teacher, positive)

    def forward(self, student: Tensor, teacher: Tensor, positive: Tensor) -> Tensor:  # type: ignore[override]
        return (margins(student, positive) - margins(teacher.detach(), positive)).pow(2).mean()


class PairwiseRankingAccuracy(LossTerm):
    """The share of triples whose positive passage scores above the negative, ``mean 1[M > 0]``: an evaluation
    measure (``trainer.monitor``), not a loss (no gradient)."""

    def check_shapes(self, scores: torch.Size, positive: torch.Size) -> None:  # type: ignore[override]
        _check("pairwise accuracy", scores, None, positive)

    def forward(self, scores: Tensor, positive: Tensor) -> Tensor:  # type: ignore[override]
        return (margins(scores.detach(), positive) > 0).float().mean()


__all__ = ["MarginMSELoss", "PairwiseRankingAccuracy", "margins"]
