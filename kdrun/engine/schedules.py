"""Learning-rate schedules by optimizer step: linear warm-up, then cosine or linear decay.

Both multiply each parameter group's base lr by a factor ``f(s)`` of the step ``s`` (0-based: the
factor of the optimizer step about to be taken), with ``W`` warm-up steps out of ``S`` in all (the
conventions of Hugging Face ``get_cosine_schedule_with_warmup`` / ``get_linear_schedule_with_warmup``):

- warm-up, ``s < W``:   ``f(s) = s / W`` (the very first step runs at lr 0, as there);
- cosine, ``s >= W``:   ``f(s) = m + (1 - m) * 0.5 * (1 + cos(pi * p))``, ``p = (s - W) / (S - W)``;
- linear, ``s >= W``:   ``f(s) = m + (1 - m) * max(0, (S - s) / (S - W))``;

with ``m = min_lr_ratio`` (default 0). Use them with ``scheduler_interval: step``; the engine passes
``total_steps`` (the stage's optimizer steps, from ``max_steps`` or ``epochs``) when the config leaves it
out. ``warmup_ratio`` sets ``W = round(warmup_ratio * S)`` when ``warmup_steps`` is 0.
"""
from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from kdrun.errors import KdrunError


def _warmup(total_steps: int, warmup_steps: int, warmup_ratio: float, min_lr_ratio: float) -> int:
    if total_steps is None or int(total_steps) < 1:
        raise KdrunError(f"schedule: total_steps must be at least 1, got {total_steps}")
    if warmup_steps < 0 or not 0.0 <= warmup_ratio < 1.0 or not 0.0 <= min_lr_ratio <= 1.0:
        raise KdrunError(f"schedule: need warmup_steps >= 0, 0 <= warmup_ratio < 1 and 0 <= min_lr_ratio <= 1, got "
                         f"{warmup_steps}, {warmup_ratio}, {min_lr_ratio}")
    w = int(warmup_steps) if warmup_steps else int(round(warmup_ratio * total_steps))
    return min(w, int(total_steps))


def warmup_cosine_factor(step: int, total_steps: int, warmup: int, min_lr_ratio: float = 0.0) -> float:
    """``f(s)`` of the cosine schedule (see the module docstring)."""
    if step < warmup:
        return step / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_linear_factor(step: int, total_steps: int, warmup: int, min_lr_ratio: float = 0.0) -> float:
    """``f(s)`` of the linear schedule (see the module docstring)."""
    if step < warmup:
        return step / warmup
    return min_lr_ratio + (1.0 - min_lr_ratio) * max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` (or ``warmup_ratio`` of the stage), then cosine decay to
    ``min_lr_ratio`` of the base lr at ``total_steps``."""
    w = _warmup(total_steps, warmup_steps, warmup_ratio, min_lr_ratio)
    return LambdaLR(optimizer, lambda s: warmup_cosine_factor(s, int(total_steps), w, float(min_lr_ratio)))


def warmup_linear(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0,
                  min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` (or ``warmup_ratio`` of the stage), then linear decay to
    ``min_lr_ratio`` of the base lr at ``total_steps``."""
    w = _warmup(total_steps, warmup_steps, warmup_ratio, min_lr_ratio)
    return LambdaLR(optimizer, lambda s: warmup_linear_factor(s, int(total_steps), w, float(min_lr_ratio)))


__all__ = ["warmup_cosine", "warmup_cosine_factor", "warmup_linear", "warmup_linear_factor"]
