"""Parameters a model keeps frozen whatever the stage: those built with ``requires_grad=False``.

A LoRA student (``peft``) freezes its base weights and trains only its adapters; a model may freeze an
embedding table it was given. The builder records these names once (:func:`mark_frozen`); the engine then
trains a model's other parameters only (:func:`trainable_parameters`) and never unfreezes them
(:func:`set_trainable`).
"""
from __future__ import annotations

from torch import nn

_ATTR = "_kdrun_frozen"


def mark_frozen(model: nn.Module) -> None:
    """Record the names of ``model``'s parameters that are frozen now (call once, right after building it)."""
    object.__setattr__(model, _ATTR, frozenset(n for n, p in model.named_parameters() if not p.requires_grad))


def frozen_names(model: nn.Module) -> frozenset[str]:
    return getattr(model, _ATTR, frozenset())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a stage that trains ``model`` optimises."""
    frozen = frozen_names(model)
    return [p for n, p in model.named_parameters() if n not in frozen]


def set_trainable(model: nn.Module, trains: bool) -> None:
    """``requires_grad`` on for a trained model's trainable parameters, off for everything else."""
    frozen = frozen_names(model)
    for n, p in model.named_parameters():
        p.requires_grad_(trains and n not in frozen)
