"""The contract every loss term follows.

A loss term is an ``nn.Module`` whose ``forward`` takes named tensors as keyword arguments and
returns either a scalar tensor or a ``dict[str, Tensor]`` of named scalar parts (the engine sums
the parts and logs each one as ``loss/<term>.<part>``). The builder maps the keyword arguments to
tensors of the step namespace with the term's ``inputs`` config, e.g.::

    loss:
      kd:
        _target_: kdrun.losses.KDLoss
        weight: 0.9                                   # kdrun key: the term's weight
        inputs: {student: student.logits, teacher: teacher.logits}
        temperature: 4                                # constructor argument

Keys of a term's config that kdrun itself reads (``weight``, ``inputs``, ``warmup_epochs``) are
removed before the class is instantiated; everything else goes to the constructor.

Conventions:
- The tensors of frozen models (teachers) arrive without autograd history; a term must never try to
  send gradients to them.
- State a term keeps across steps (a memory bank, a running statistic) lives in registered buffers or
  parameters, so it is saved in checkpoints and restored on resume.
- Trainable parameters of a term (CRD's embedding heads, VID's variances) are trained together with
  the stage's student and are never part of the exported student.
- A term may define ``check_shapes(**shapes)`` that raises ``ValueError`` with a clear message when the
  shapes it was given cannot work; the builder calls it at build time with ``torch.Size`` values.
- A term that owns trainable modules or buffers whose sizes depend on its inputs (CRD's embedding
  heads and memory bank, VID's regressors) creates them in ``setup(shapes, num_train)``, which the
  builder calls once, before the optimizer is built and before a checkpoint is loaded, with the
  ``torch.Size`` of every input (batch dimension included) and the number of training samples.
- A term that needs the training progress (warm-ups, temperature schedules) may define
  ``set_progress(epoch: int, total_epochs: int)``; the engine calls it at the start of every epoch.
- A term that needs to see the batch's sample indices (CRD) reads ``batch.index`` through ``inputs``.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

LossOutput = Union[Tensor, dict[str, Tensor]]


class LossTerm(nn.Module):
    """Base class of loss terms: documents the contract; subclasses implement ``forward``."""

    def check_shapes(self, **shapes: torch.Size) -> None:  # pragma: no cover - default accepts all
        """Raise ValueError naming the offending inputs when ``shapes`` cannot work."""

    def setup(self, shapes: dict[str, torch.Size], num_train: int) -> None:
        """Create input-size-dependent sub-modules and buffers (called once at build time)."""

    def set_progress(self, epoch: int, total_epochs: int) -> None:
        """Called by the engine at the start of every epoch (0-based ``epoch``)."""


def require_same_shape(term: str, a_name: str, a: torch.Size, b_name: str, b: torch.Size) -> None:
    """Raise a ValueError that names both inputs when their shapes differ."""
    if tuple(a) != tuple(b):
        raise ValueError(
            f"{term}: inputs '{a_name}' {tuple(a)} and '{b_name}' {tuple(b)} must have the same shape "
            f"(add an adapter that maps one onto the other)"
        )
