"""Adam for a component's own parameters, its state in the component's buffers (so checkpoints hold it).

Components that train a part of themselves outside the stage's optimizer (TGeo-KD's fusion network, HARD's
augmentor: both in an outer step) use it. Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR
2015: ``m <- b1 m + (1 - b1) g``, ``v <- b2 v + (1 - b2) g^2``, ``p <- p - lr m_hat / (sqrt(v_hat) + eps)`` with
``m_hat = m / (1 - b1^n)``, ``v_hat = v / (1 - b2^n)`` after n steps (torch.optim.Adam without weight decay).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


def add_adam_state(module: nn.Module, params: Sequence[nn.Parameter]) -> None:
    """Register the moments of ``params`` (``adam_m<i>``, ``adam_v<i>``) and the step count (``adam_steps``)."""
    for i, p in enumerate(params):
        module.register_buffer(f"adam_m{i}", torch.zeros_like(p))
        module.register_buffer(f"adam_v{i}", torch.zeros_like(p))
    module.register_buffer("adam_steps", torch.zeros((), dtype=torch.long))


@torch.no_grad()
def adam_step(module: nn.Module, params: Sequence[nn.Parameter], grads: Sequence[Tensor], lr: float,
              betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam step of ``params`` with ``grads``, the state in ``module``'s buffers (:func:`add_adam_state`)."""
    module.adam_steps += 1
    b1, b2 = betas
    n = module.adam_steps.float()
    for i, (p, g) in enumerate(zip(params, grads)):
        m, v = getattr(module, f"adam_m{i}"), getattr(module, f"adam_v{i}")
        m.mul_(b1).add_(g, alpha=1 - b1)
        v.mul_(b2).addcmul_(g, g, value=1 - b2)
        p.sub_(lr * (m / (1 - b1 ** n)) / ((v / (1 - b2 ** n)).sqrt() + eps))


__all__ = ["adam_step", "add_adam_state"]
