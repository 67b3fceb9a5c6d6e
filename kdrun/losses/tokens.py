"""Loss terms over token sequences: a value per position, averaged over the valid tokens of a mask.

Each term returns the mean over its micro-batch's valid tokens, ``sum_{b,t} m_bt l_bt / sum_{b,t} m_bt``
(0 when the mask holds no token), and declares ``mean_over = "tokens"`` with its mask argument, so
that under gradient accumulation and data parallelism the engine turns these means into the mean over
every valid token of the optimizer step (:mod:`kdrun.engine.accumulate`) -- not a mean of
micro-batch means, which over-weights short sequences.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.losses.base import LossTerm
from kdrun.losses.features import to_float


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    m = (mask != 0).to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def _check(term: str, logits: torch.Size, mask: torch.Size, other: tuple[str, torch.Size] | None = None) -> None:
    if len(logits) != 3:
        raise ValueError(f"{term}: logits must be (batch, positions, vocabulary), got {tuple(logits)}")
    if tuple(mask) != tuple(logits[:2]):
        raise ValueError(f"{term}: 'mask' {tuple(mask)} must be (batch, positions) = {tuple(logits[:2])}")
    if other is not None and tuple(other[1]) != tuple(logits):
        raise ValueError(f"{term}: '{other[0]}' {tuple(other[1])} must have the shape of the logits {tuple(logits)}")


class TokenCrossEntropy(LossTerm):
    """Next-token cross-entropy averaged over valid tokens:
    ``sum_{b,t} m_bt * (-log softmax(z_bt)[y_bt]) / sum_{b,t} m_bt``.

    Inputs: ``logits`` (B, T, V), ``target`` (B, T) token ids (the next token of each position),
    ``mask`` (B, T), non-zero where the position counts (a batch field, e.g. ``batch.loss_mask``:
    response tokens only, no padding)."""

    mean_over = "tokens"
    count_input = "mask"

    def check_shapes(self, logits: torch.Size, target: torch.Size, mask: torch.Size) -> None:  # type: ignore[override]
        _check("token cross-entropy", logits, mask)
        if tuple(target) != tuple(logits[:2]):
            raise ValueError(f"token cross-entropy: 'target' {tuple(target)} must be (batch, positions) = {tuple(logits[:2])}")

    def forward(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        z = to_float(logits)
        per_token = F.cross_entropy(z.flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
        return _masked_mean(per_token, mask)


class TokenKLLoss(LossTerm):
    """Forward KL between the teacher's and the student's next-token distributions at temperature T,
    averaged over valid tokens and scaled by T^2 (Hinton et al. 2015, per position):

    ``T^2 * sum_{b,t} m_bt KL(softmax(z^t_bt / T) || softmax(z^s_bt / T)) / sum_{b,t} m_bt``.

    Inputs: ``student``, ``teacher`` (B, T, V) logits over the same vocabulary, ``mask`` (B, T) a batch
    field. Args: temperature (default 1.0)."""

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"token KL: temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def check_shapes(self, student: torch.Size, teacher: torch.Size, mask: torch.Size) -> None:  # type: ignore[override]
        _check("token KL", student, mask, ("teacher", teacher))

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        t = self.temperature
        log_s = F.log_softmax(to_float(student) / t, dim=-1)
        log_t = F.log_softmax(to_float(teacher).detach() / t, dim=-1)
        per_token = (log_t.exp() * (log_t - log_s)).sum(dim=-1)
        return t * t * _masked_mean(per_token, mask)


__all__ = ["TokenCrossEntropy", "TokenKLLoss"]
