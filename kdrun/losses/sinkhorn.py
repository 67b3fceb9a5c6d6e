"""SinKD: the batch-wise Sinkhorn distance between student and teacher predictions (Cui et al., "SinKD:
Sinkhorn Distance Minimization for Knowledge Distillation", LREC-COLING 2024, arXiv 2402.17110; code
2018cx/SinKD, ``loss.py``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.losses.base import LossTerm, require_same_shape


def sinkhorn_plan(cost: Tensor, epsilon: float, iterations: int) -> Tensor:
    """The transport plan of ``cost`` (B x B): ``K = exp(-cost / epsilon)`` normalised ``iterations`` times,
    rows first, then columns (the authors' order), computed in the log domain so that small ``epsilon`` does
    not underflow ``K`` (the same plan as the direct iteration wherever that is finite)."""
    log_p = -cost / epsilon
    for _ in range(iterations):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
    return log_p.exp()


class SinkhornLoss(LossTerm):
    """SinKD's Sinkhorn distance, computed across the batch (not across the classes of one sample).

    With ``P_s = softmax(z_s / T)`` and ``P_t = softmax(z_t / T)`` (B x C), the cost between sample i of the
    student and sample j of the teacher is ``W_ij = ||P_s,i - P_t,j||_1`` (B x B); ``Pi`` is the Sinkhorn plan
    of ``W`` (``exp(-W / epsilon)`` with alternating row and column normalisation, ``iterations`` times,
    rows first), and

        ``L = scale * sum_ij Pi_ij W_ij``

    with the gradient flowing through both ``Pi`` and ``W``, as in the authors' code.

    Defaults are the authors' code's: T 2 (fixed inside their loss), epsilon 0.1, 20 iterations, and its
    constant factor 0.0008 * 20 / 8 = 0.002 (``scale``). Their GLUE total is
    ``alpha * KD + (1 - alpha) * CE + beta * L`` (SST-2: alpha 0.9, T 2, beta 0.8; ``recipes/bert_sst2_sinkd``).

    Batch semantics: the plan couples the samples of one micro-batch, so the value depends on the batch
    size and composition. Under gradient accumulation each micro-batch is its own problem; under DDP each
    rank solves the problem of its own shard (the authors' code does the same, per process), so a global
    batch split over more ranks is a different objective; nothing is gathered across ranks.

    Args:
        temperature: T (default 2). epsilon: entropic regularisation (default 0.1).
        iterations: Sinkhorn normalisation rounds (default 20). scale: constant factor (default 0.002).
    """

    def __init__(self, temperature: float = 2.0, epsilon: float = 0.1, iterations: int = 20, scale: float = 0.002) -> None:
        super().__init__()
        if temperature <= 0 or epsilon <= 0:
            raise ValueError(f"SinKD: temperature and epsilon must be positive, got {temperature} and {epsilon}")
        if int(iterations) < 1:
            raise ValueError(f"SinKD: iterations must be at least 1, got {iterations}")
        self.temperature, self.epsilon = float(temperature), float(epsilon)
        self.iterations, self.scale = int(iterations), float(scale)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("SinKD", "student", student, "teacher", teacher)
        if len(student) != 2:
            raise ValueError(f"SinKD: logits must be (batch, classes), got {tuple(student)}")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        p_s = F.softmax(student.float() / self.temperature, dim=1)
        p_t = F.softmax(teacher.float() / self.temperature, dim=1)
        cost = torch.cdist(p_s, p_t, p=1)
        plan = sinkhorn_plan(cost, self.epsilon, self.iterations)
        return self.scale * (plan * cost).sum()
