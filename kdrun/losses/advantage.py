"""ADPA, Advantage-Guided Distillation for Preference Alignment (Gao et al., ICLR 2025, arXiv 2502.17927; the
authors' SLIT-AI/ADPA README): a distribution-level reward for every vocabulary entry, the advantage of a
preference-aligned teacher over its reference,

    A_t(a) = log pi_dpo(a | s_t) - log pi_ref(a | s_t),

and the student maximises its expectation under its own next-token distribution, ``sum_a q(a | s_t) A_t(a)``, at the
positions of the responses it is given (the student's own responses, ADPA's rejected side). The term's value is
``-mean_t sum_a q(a | s_t) A_t(a)``, the mean over the scored tokens; the recipe adds cross-entropy on the chosen
responses (``L = -log q(y_w | x) - gamma ...``, gamma the term's weight).

Two ways to get the advantage:

- :class:`AdvantageDistillationLoss`: live, from two frozen teachers, exactly over the vocabulary;
- :class:`CachedAdvantageLoss`: from a cache of both teachers written once (``kdrun-cache --model teacher
  --reference reference``; the authors also precompute the advantage offline), no teacher in the run. The cache
  holds the aligned teacher's top-K tokens with both teachers' log-probabilities there, and each teacher's mass on
  the rest of the vocabulary as one tail bucket, so the advantage is known on K + 1 buckets:
  ``A_k = log p_dpo(a_k) - log p_ref(a_k)`` and ``A_tail = log p_dpo(tail) - log p_ref(tail)``; the student's
  expectation is ``sum_k q(a_k) A_k + q(tail) A_tail``. At K = V it is the live value; below, the tail's advantage is
  the bucket's, not each token's (kdrun's approximation; how the authors store theirs was not read).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import LossTerm
from kdrun.losses.features import to_float
from kdrun.losses.tokens import LOG_FLOOR, _check, _check_chunk, _log1mexp, _token_mean, log_probs


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


class CachedAdvantageLoss(LossTerm):
    """ADPA's term on a two-teacher cache: ``-(sum_k q(a_k) A_k + q(tail) A_tail)`` per scored token, averaged (see the
    module docstring).

    Inputs: ``student`` (B, T, V) logits; ``ids`` (B, T, K) ``batch.cache_ids``; ``aligned`` (B, T, K)
    ``batch.cache_logp`` and ``aligned_tail`` (B, T) ``batch.cache_tail``; ``reference`` (B, T, K)
    ``batch.cache_ref_logp`` and ``reference_tail`` (B, T) ``batch.cache_ref_tail``; ``mask`` (B, T). Args:
    ``chunk_size`` (1024).
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, chunk_size: int | None = 1024) -> None:
        super().__init__()
        self.chunk_size = _check_chunk(chunk_size)

    def check_shapes(self, student: torch.Size, ids: torch.Size, aligned: torch.Size, aligned_tail: torch.Size,  # type: ignore[override]
                     reference: torch.Size, reference_tail: torch.Size, mask: torch.Size) -> None:
        _check("cached advantage distillation", student, mask)
        per_token = tuple(student[:2])
        if not (tuple(ids) == tuple(aligned) == tuple(reference) and tuple(ids[:2]) == per_token
                and tuple(aligned_tail) == tuple(reference_tail) == per_token):
            raise ValueError(f"cached advantage distillation: ids {tuple(ids)}, aligned {tuple(aligned)} and reference "
                             f"{tuple(reference)} must be (batch, positions, K), the tails {tuple(aligned_tail)} and "
                             f"{tuple(reference_tail)} (batch, positions), for logits {tuple(student)}: read them from "
                             f"batch.cache_ids, cache_logp, cache_tail, cache_ref_logp, cache_ref_tail (a cache written by "
                             f"kdrun-cache --reference)")

    @staticmethod
    def per_token(student: Tensor, ids: Tensor, aligned: Tensor, aligned_tail: Tensor, reference: Tensor,
                  reference_tail: Tensor) -> Tensor:
        log_s = log_probs(student).gather(-1, ids.long())
        q_top = log_s.exp()
        q_tail = _log1mexp(torch.logsumexp(log_s, dim=-1)).exp()
        a_top = to_float(aligned) - to_float(reference)
        a_tail = to_float(aligned_tail).clamp_min(LOG_FLOOR) - to_float(reference_tail).clamp_min(LOG_FLOOR)
        return -((q_top * a_top).sum(dim=-1) + q_tail * a_tail)

    def forward(self, student: Tensor, ids: Tensor, aligned: Tensor, aligned_tail: Tensor, reference: Tensor,  # type: ignore[override]
                reference_tail: Tensor, mask: Tensor) -> Tensor:
        return _token_mean(self.per_token, [student, ids, aligned, aligned_tail, reference, reference_tail], mask,
                           self.chunk_size)


__all__ = ["AdvantageDistillationLoss", "CachedAdvantageLoss"]
