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
- Lifecycle (:class:`kdrun.component.Component`, all optional): ``setup(ctx)`` once at build time,
  before the optimizer is built and before a checkpoint is loaded, with a
  :class:`~kdrun.component.BuildContext` (the ``torch.Size`` of every input, batch dimension included;
  the number of training samples and, when known, their labels; the device; read-only access to the
  named models and their sub-modules): create trainable modules and buffers sized by the inputs
  there (CRD's embedding heads and memory bank, VID's regressors). ``on_stage_start(stage)``,
  ``on_epoch_start(epoch, total_epochs)`` and ``on_step(step, total_steps)`` are called by the engine
  for stage-dependent objectives (FT), epoch schedules (TRG's temperature) and step schedules.
- What the value averages over (``mean_over``): ``"samples"`` (default) -- the mean over the
  micro-batch's samples; ``"tokens"`` -- the mean over the valid tokens of the batch mask passed as
  the ``count_input`` argument (default ``mask``), whose ``inputs`` entry must be a ``batch.<field>``.
  The engine weights each micro-batch's mean by its share of the units of the whole accumulation
  window over all ranks, so that gradient accumulation and DDP optimise the global mean
  (:mod:`kdrun.engine.accumulate`). A term must return the mean of its own micro-batch, never a sum.
- A term that needs to see the batch's sample indices (CRD) reads ``batch.index`` through ``inputs``.
"""
from __future__ import annotations

from typing import Any, ClassVar, Union

import torch
from torch import Tensor

from kdrun.component import Component

LossOutput = Union[Tensor, dict[str, Tensor]]


class LossTerm(Component):
    """Base class of loss terms: documents the contract; subclasses implement ``forward``."""

    mean_over: ClassVar[str] = "samples"  # "samples" | "tokens" (the non-zero entries of `count_input`)
    count_input: ClassVar[str] = "mask"

    def check_shapes(self, **shapes: torch.Size) -> None:  # pragma: no cover - default accepts all
        """Raise ValueError naming the offending inputs when ``shapes`` cannot work."""


def require_same_shape(term: str, a_name: str, a: torch.Size, b_name: str, b: torch.Size) -> None:
    """Raise a ValueError that names both inputs when their shapes differ."""
    if tuple(a) != tuple(b):
        raise ValueError(
            f"{term}: inputs '{a_name}' {tuple(a)} and '{b_name}' {tuple(b)} must have the same shape "
            f"(add an adapter that maps one onto the other)"
        )


def model_input_names(ctx: Any, term: str, args: tuple[str, ...] = ("student", "teacher", "target"),
                      models: tuple[str, ...] = ("student", "teacher")) -> dict[str, str]:
    """The tensor names of a term's inputs ``args`` (``ctx.inputs``), checking that those in ``models`` are a
    model's tensors: terms that rerun models in an outer step (TGeo-KD, HARD) look them up by these names."""
    from kdrun.names import owner_of

    names = {arg: str(ctx.inputs[arg]) for arg in args}
    for arg in models:
        if owner_of(names[arg]) not in ctx.models:
            raise ValueError(f"{term}: '{arg}' must be a model's logits (e.g. {arg}.logits), got {names[arg]}")
    return names
