"""Loss terms on preference pairs (:func:`kdrun.data.text.preference_pairs`: each pair a chosen and a rejected
row, adjacent, the ``chosen`` field saying which is which).

Notation: for a row with response tokens ``y`` (its ``mask``), ``log pi(y|x) = sum_t m_t log q_t(y_t)`` is the
sequence log-probability under the student, ``|y| = sum_t m_t`` its length; ``y+`` the chosen and ``y-`` the
rejected response of a pair. Both terms return the mean over the micro-batch's pairs.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdrun.losses.base import LossTerm
from kdrun.losses.features import to_float


def token_log_probs(logits: Tensor, target: Tensor, chunk_rows: int = 4) -> Tensor:
    """(B, L) ``log softmax(z_t)[y_t]`` in float32 (any value where ``y_t`` is ignored, -100), over chunks of
    ``chunk_rows`` rows (each checkpointed when it needs gradients, so one chunk's float32 (rows, L, V) exists at a
    time)."""
    def part(z: Tensor, y: Tensor) -> Tensor:
        z = to_float(z)
        return z.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)

    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        rows = (logits[start:start + chunk_rows], target[start:start + chunk_rows])
        if torch.is_grad_enabled() and logits.requires_grad:
            out.append(checkpoint(part, *rows, use_reentrant=False))
        else:
            out.append(part(*rows))
    return torch.cat(out)


def sequence_log_probs(logits: Tensor, target: Tensor, mask: Tensor, chunk_rows: int = 4) -> Tensor:
    """(B,) ``sum_t m_t log softmax(z_t)[y_t]`` per row (:func:`token_log_probs`, masked and summed)."""
    return (token_log_probs(logits, target, chunk_rows) * (mask != 0)).sum(dim=-1)


def _check_rows(term: str, logits: torch.Size, target: torch.Size, mask: torch.Size, chosen: torch.Size) -> None:
    if len(logits) != 3 or tuple(target) != tuple(logits[:2]) or tuple(mask) != tuple(logits[:2]):
        raise ValueError(f"{term}: needs logits (B, L, V) with target and mask (B, L); got {tuple(logits)}, {tuple(target)}, "
                         f"{tuple(mask)}")
    if tuple(chosen) != (logits[0],) or logits[0] % 2:
        raise ValueError(f"{term}: 'chosen' must be (B,) over an even number of rows (pairs; data=preference_pairs), got "
                         f"{tuple(chosen)} for {logits[0]} rows")


class REDILoss(LossTerm):
    """REDI, Reinforcement Distillation (Xu et al., arXiv 2505.24850; the authors' ``reinforce`` loss type):
    ``L = -c+ log pi(y+|x) / |y+| + c- log pi(y-|x) / |y-|`` per pair, reference-free and length-normalised,
    with asymmetric weights ``chosen_coef`` c+ (1.0) and ``rejected_coef`` c- (0.8; the paper's alpha). The pairs
    are teacher traces (a verified-correct and an incorrect one per prompt); no teacher runs in training. The
    paper's optional weighting of negatives by ``exp(gamma * mean log p(y-))`` is not built.
    """

    def __init__(self, chosen_coef: float = 1.0, rejected_coef: float = 0.8, chunk_rows: int = 4) -> None:
        super().__init__()
        self.chosen_coef, self.rejected_coef, self.chunk_rows = float(chosen_coef), float(rejected_coef), int(chunk_rows)

    def check_shapes(self, logits: torch.Size, target: torch.Size, mask: torch.Size, chosen: torch.Size) -> None:  # type: ignore[override]
        _check_rows("REDI", logits, target, mask, chosen)

    def forward(self, logits: Tensor, target: Tensor, mask: Tensor, chosen: Tensor) -> Tensor:  # type: ignore[override]
        mean_logp = sequence_log_probs(logits, target, mask, self.chunk_rows) / (mask != 0).sum(-1).clamp_min(1)
        coef = torch.where(chosen.bool(), -self.chosen_coef, self.rejected_coef)
        return (coef * mean_logp).sum() / (logits.shape[0] // 2)


class DPOLoss(LossTerm):
    """DPO (Rafailov et al., NeurIPS 2023) against a frozen reference, which may be the teacher (LLaVA-MoD's
    preference distillation, Shu et al. ICLR 2025):
    ``L = -log sigmoid(beta [(log pi(y+) - log ref(y+)) - (log pi(y-) - log ref(y-))])`` per pair, sequence
    log-probabilities summed over the response tokens, ``beta`` 0.1 (the DPO paper's common value; LLaVA-MoD's
    is not stated in what was read). Both models must read the same token ids (one vocabulary).
    """

    def __init__(self, beta: float = 0.1, chunk_rows: int = 4) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"DPO: beta must be > 0, got {beta}")
        self.beta, self.chunk_rows = float(beta), int(chunk_rows)

    def check_shapes(self, logits: torch.Size, reference: torch.Size, target: torch.Size, mask: torch.Size,  # type: ignore[override]
                     chosen: torch.Size) -> None:
        _check_rows("DPO", logits, target, mask, chosen)
        if tuple(reference) != tuple(logits):
            raise ValueError(f"DPO: 'reference' logits {tuple(reference)} must have the policy's shape {tuple(logits)} "
                             f"(the same tokens and vocabulary)")

    def forward(self, logits: Tensor, reference: Tensor, target: Tensor, mask: Tensor, chosen: Tensor) -> Tensor:  # type: ignore[override]
        with torch.no_grad():
            ref = sequence_log_probs(reference.detach(), target, mask, self.chunk_rows)
        ratio = sequence_log_probs(logits, target, mask, self.chunk_rows) - ref
        signed = torch.where(chosen.bool(), ratio, -ratio)
        margin = signed.view(-1, 2).sum(dim=1)  # adjacent rows form a pair
        return F.softplus(-self.beta * margin).mean()


__all__ = ["DPOLoss", "REDILoss", "sequence_log_probs", "token_log_probs"]
