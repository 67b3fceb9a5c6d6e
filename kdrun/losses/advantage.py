"""ADPA, Advantage-Guided Distillation for Preference Alignment (Gao et al., ICLR 2025, arXiv 2502.17927; the
authors' SLIT-AI/ADPA README): a distribution-level reward for every vocabulary entry, the advantage of a
preference-aligned teacher over its reference,

    A_t(a) = log pi_dpo(a | s_t) - log pi_ref(a | s_t),

and the student maximises its expectation under its own next-token distribution, ``sum_a q(a | s_t) A_t(a)``, at the
positions of the responses it is given (the student's own responses, ADPA's rejected side). The term's value is
``-mean_t sum_a q(a | s_t) A_t(a)``, the mean over the scored tokens; the recipe adds cross-entropy on the chosen
responses (``L = -log q(y_w | x) - gamma ...``, gamma the term's weight). The advantage is computed live from two
frozen teachers (the authors precompute it offline; a kdrun cache of two models is not built).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import LossTerm
from kdrun.losses.tokens import _check, _check_chunk, _token_mean, log_probs


class AdvantageDistillationLoss(LossTerm):
    """``-sum_a q(a) (log p_aligned(a) - log p_reference(a))`` per scored token, averaged (see the module docstring).

    Inputs: ``student``, ``aligned``, ``reference`` (B, T, V) logits (the two teachers frozen), ``mask`` (B, T).
    Args: ``chunk_size`` (1024).
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, chunk_size: int | None = 1024) -> None:
        super().__init__()
        self.chunk_size = _check_chunk(chunk_size)

    def check_shapes(self, student: torch.Size, aligned: torch.Size, reference: torch.Size, mask: torch.Size) -> None:  # type: ignore[override]
        _check("advantage distillation", student, mask, ("aligned", aligned))
        _check("advantage distillation", student, mask, ("reference", reference))

    @staticmethod
    def per_token(student: Tensor, aligned: Tensor, reference: Tensor) -> Tensor:
        advantage = log_probs(aligned) - log_probs(reference)
        return -(log_probs(student).exp() * advantage).sum(dim=-1)

    def forward(self, student: Tensor, aligned: Tensor, reference: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return _token_mean(self.per_token, [student, aligned.detach(), reference.detach()], mask, self.chunk_size)


__all__ = ["AdvantageDistillationLoss"]
