"""A model's own scalar output as a loss term."""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import LossTerm


class ModelOutputLoss(LossTerm):
    """``value`` (a tensor a model returns, e.g. ``student.aux_loss``, the router load-balancing loss of a Hugging
    Face mixture-of-experts model built with ``output_router_logits: true``; Fedus et al., JMLR 2022), averaged to a
    scalar. The term's ``weight`` is the coefficient (Mixtral's config default ``router_aux_loss_coef`` is 0.001)."""

    def check_shapes(self, value: torch.Size) -> None:  # type: ignore[override]
        if len(value) > 1:
            raise ValueError(f"model output term: 'value' must be a scalar or a vector, got shape {tuple(value)}")

    def forward(self, value: Tensor) -> Tensor:  # type: ignore[override]
        return value.float().mean()


__all__ = ["ModelOutputLoss"]
