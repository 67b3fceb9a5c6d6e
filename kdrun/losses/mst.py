"""MST-Distill's third stage: distillation from a routed mixture of specialised (masked) teachers.

Li et al., "MST-Distill: Mixture of Specialized Teachers for Cross-Modal Knowledge Distillation", ACM MM
2025 (arXiv 2507.07015), read from the authors' code (Gray-OREO/MST-Distill: ``KD_methods/MST.py``,
``main-MST-Distill.py``). K teachers (the multimodal teacher and a cross-modal assistant, each with a
mask network at one of its layers: :mod:`kdrun.models.masking`) are routed per sample by a gate that
reads the student's logits s_i:

    g_i = softmax(W2 (W1 s_i + b1) + b2)                     (two linear maps, no activation: GateNet)
    L_kd = 1/k sum_{j in topk(g_i)} T^2 KL(softmax(t_ij / T) || softmax(s_i / T))   averaged over the batch
    L_lb = 1/K sum_k u_k log(u_k / gbar_k),  u_k = 1/K,  gbar = mean_i g_i    (load balancing, KL to uniform)
    L    = w_kl(e) L_kd + w_lb(e) L_lb                                         (plus CE, a separate term)

The chosen teachers' indices carry no gradient, so the gate learns from the load-balancing term only;
that term's gradient also reaches the student through its logits (as in the code). The weights decay by
epoch e (0-based) as the code's ``w_lb *= 0.9 if epoch % 10 == 0`` and ``w_kl *= 0.5 if epoch % 30 == 0``
after each epoch: ``w_lb(e) = w_lb 0.9^ceil(e / 10)``, ``w_kl(e) = w_kl 0.5^ceil(e / 30)``. Defaults: k 1,
T 4, w_kl 1, w_lb 1 (the code's).

The batch mean gbar is over the micro-batch of one rank: under gradient accumulation or data parallelism
the load-balancing term balances each micro-batch, not the global batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.losses.base import LossTerm
from kdrun.losses.features import to_float


class MixtureOfTeachersKD(LossTerm):
    """Top-k routed KD over K teachers with a load-balanced gate on the student's logits (see the module).

    Args:
        num_classes: C. num_teachers: K. k: teachers per sample (1). temperature: T (4). kd_weight: w_kl
        (1). balance_weight: w_lb (1). decay: the code's epoch decays of both weights (True).
    Inputs: ``student`` (B, C) logits, ``teachers`` a list of K (B, C) logits.
    """

    def __init__(self, num_classes: int, num_teachers: int, k: int = 1, temperature: float = 4.0, kd_weight: float = 1.0,
                 balance_weight: float = 1.0, decay: bool = True) -> None:
        super().__init__()
        if not 1 <= int(k) <= int(num_teachers) or temperature <= 0:
            raise ValueError(f"mixture of teachers: need 1 <= k <= num_teachers and a positive temperature, got k={k}, "
                             f"num_teachers={num_teachers}, temperature={temperature}")
        c, n = int(num_classes), int(num_teachers)
        self.num_classes, self.num_teachers, self.k, self.temperature = c, n, int(k), float(temperature)
        self.kd_weight, self.balance_weight, self.decay = float(kd_weight), float(balance_weight), bool(decay)
        self.gate = nn.Sequential(nn.Linear(c, 2 * c), nn.Linear(2 * c, n))
        self.epoch = 0

    def check_shapes(self, student: torch.Size, teachers) -> None:  # type: ignore[override]
        shapes = [tuple(t) for t in teachers] if not isinstance(teachers, torch.Size) else [tuple(teachers)]
        if len(shapes) != self.num_teachers:
            raise ValueError(f"mixture of teachers: 'teachers' lists {len(shapes)} tensors, num_teachers is {self.num_teachers}")
        if tuple(student) != (student[0], self.num_classes) or any(s != tuple(student) for s in shapes):
            raise ValueError(f"mixture of teachers: student {tuple(student)} and every teacher {shapes} must be "
                             f"(batch, num_classes={self.num_classes})")

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.epoch = int(epoch)

    def weights(self) -> tuple[float, float]:
        """(w_kl, w_lb) of the current epoch."""
        if not self.decay:
            return self.kd_weight, self.balance_weight
        e = self.epoch
        return self.kd_weight * 0.5 ** math.ceil(e / 30), self.balance_weight * 0.9 ** math.ceil(e / 10)

    def routing(self, student: Tensor) -> Tensor:
        """g (B, K): the gate's softmax over teachers."""
        return F.softmax(self.gate(to_float(student)), dim=1)

    def forward(self, student: Tensor, teachers: list[Tensor]) -> dict[str, Tensor]:  # type: ignore[override]
        s = to_float(student)
        g = self.routing(s)
        chosen = g.topk(self.k, dim=1).indices  # (B, k): no gradient through the choice
        stacked = torch.stack([to_float(t).detach() for t in teachers], dim=1)  # (B, K, C)
        picked = stacked.gather(1, chosen[..., None].expand(-1, -1, stacked.shape[-1]))  # (B, k, C)
        temp = self.temperature
        log_p_s = F.log_softmax(s / temp, dim=1)[:, None]
        log_p_t = F.log_softmax(picked / temp, dim=2)
        kd = temp * temp * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=2).mean()  # mean over the k and the batch
        mean_g = g.mean(dim=0)
        n = self.num_teachers
        balance = (math.log(1.0 / n) - mean_g.log()).sum() / (n * n)  # (1/K) sum_k u_k log(u_k / gbar_k), u_k = 1/K
        w_kl, w_lb = self.weights()
        return {"kd": w_kl * kd, "balance": w_lb * balance}


__all__ = ["MixtureOfTeachersKD"]
