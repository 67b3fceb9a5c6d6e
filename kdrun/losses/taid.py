"""TAID's interpolated target and its adaptive schedule (Shing et al., "TAID: Temporally Adaptive
Interpolated Distillation for Efficient Knowledge Transfer in Language Models", ICLR 2025; code
SakanaAI/TAID ``src/distil_losses/taid.py``), shared by the per-token term
(:class:`kdrun.losses.TAIDLoss`) and the classifier term (:class:`TAIDClassifierLoss`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdrun.losses.base import LossTerm
from kdrun.losses.features import to_float


def interpolated_cross_entropy(student: Tensor, teacher: Tensor, t: Tensor | float) -> Tensor:
    """``-sum_v p_t(v) log softmax(z_s)(v)`` per row (last dimension), with the target
    ``p_t = softmax((1 - t) sg(z_s) + t sg(z_t))`` (half precision computed in float32)."""
    zs, zt = to_float(student), to_float(teacher).detach()
    target = F.softmax((1 - t) * zs.detach() + t * zt, dim=-1)
    return -(target * F.log_softmax(zs, dim=-1)).sum(dim=-1)


class TAIDSchedule(LossTerm):
    """The interpolation weight ``t`` of TAID, moved once per optimizer step from the detached loss ``l`` of
    the previous step (its mean over the step's micro-batches and ranks)::

        rel = (l_prev - l) / l_prev;  m <- beta m + (1 - beta) rel;  delta = alpha sigmoid(m) (1 - t)
        t <- min(t_end, max(t_start + (t_end - t_start) step / total_steps, t + delta))

    Defaults: ``t_start`` 0.4, ``t_end`` 1.0, ``alpha`` 5e-4, ``beta`` 0.99; ``adaptive=false`` keeps only
    the linear floor. Under data parallelism ``l`` is the mean over ranks (one all-reduce per step), so every
    rank holds the same ``t`` (the reference code uses each rank's own loss). ``t``, ``m`` and ``l_prev`` are
    buffers: saved in checkpoints, restored on resume. Subclasses call :meth:`record_loss` in ``forward``.
    """

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 adaptive: bool = True) -> None:
        super().__init__()
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"TAID: need 0 <= t_start <= t_end <= 1, got {t_start}, {t_end}")
        self.t_start, self.t_end, self.alpha, self.beta = float(t_start), float(t_end), float(alpha), float(beta)
        self.adaptive = bool(adaptive)
        self.register_buffer("t", torch.tensor(float(t_start)))
        self.register_buffer("momentum", torch.zeros(()))
        self.register_buffer("prev_loss", torch.full((), float("nan")))
        self.register_buffer("step_loss", torch.zeros(2))  # this step's (weighted loss sum, weight: tokens or samples)

    def on_step(self, step: int, total_steps: int) -> None:
        """Update ``t`` from the previous optimizer step's loss (device arithmetic only, no host read)."""
        floor = self.t_start + (self.t_end - self.t_start) * step / max(total_steps, 1)
        t = self.t
        if self.adaptive:
            acc = self.step_loss.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(acc)
            seen = acc[1] > 0
            loss = acc[0] / acc[1].clamp_min(1.0)
            prev = self.prev_loss
            rel = torch.where(torch.isfinite(prev) & seen, (prev - loss) / prev.clamp_min(1e-12), torch.zeros_like(loss))
            m = torch.where(seen, self.beta * self.momentum + (1 - self.beta) * rel, self.momentum)
            t = torch.where(seen, t + self.alpha * torch.sigmoid(m) * (1 - t), t)
            self.momentum.copy_(m)
            self.prev_loss.copy_(torch.where(seen, loss, prev))
        self.t.copy_(t.clamp_min(floor).clamp_max(self.t_end))
        self.step_loss.zero_()

    def record_loss(self, loss: Tensor, count: Tensor | int) -> None:
        """Add a training micro-batch's mean ``loss`` over ``count`` units to this step's ``l``."""
        if self.training and torch.is_grad_enabled():
            count = torch.as_tensor(count, device=self.step_loss.device).to(self.step_loss.dtype)
            self.step_loss.add_(torch.stack([loss.detach().to(self.step_loss.dtype) * count, count]))


class TAIDClassifierLoss(TAIDSchedule):
    """TAID for class logits: ``L = 1/B sum_i -sum_c p_t,ic log softmax(z_s,i)_c`` with the interpolated target
    ``p_t = softmax((1 - t) sg(z_s) + t z_t)`` and the step-level schedule of :class:`TAIDSchedule` (the step's
    ``l`` is its mean over every sample of the step). The paper distils language models; kdrun's CIFAR-100
    recipe (``cifar100_taid``) is its own application, with no published number.

    Inputs: ``student``, ``teacher`` (B, C) logits.
    """

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        if len(student) != 2 or tuple(student) != tuple(teacher):
            raise ValueError(f"TAID: student and teacher logits must be equal (batch, classes) shapes, got "
                             f"{tuple(student)} and {tuple(teacher)} (token logits: use kdrun.losses.TAIDLoss with a mask)")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        loss = interpolated_cross_entropy(student, teacher, self.t).mean()
        self.record_loss(loss, student.shape[0])
        return loss
