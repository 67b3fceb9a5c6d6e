"""DDK, Distilling Domain Knowledge (Liu et al., "DDK: Distilling Domain Knowledge for Efficient Large Language
Models", NeurIPS 2024): the distillation data's mixture of domains follows where the student lags the teacher most.

The term is DDK's distillation part, ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))`` per token (the recipe adds the
cross-entropy), and it owns the **domain weights** that steer the training sampler (every training batch is drawn
with replacement, a sample of domain d with probability ``w_d / n_d``; :class:`kdrun.data.tensors.TensorLoader`):

- Between updates it sums, per domain (``domain``: ``batch.domain``), the student's and the teacher's token
  cross-entropy on the batches it sees (device buffers, no host read).
- Every ``interval`` optimizer steps the sums are all-reduced over ranks, each domain's mean losses ``l_S``, ``l_T``
  give the discrepancy factor ``softmax(l_S / l_T)`` over domains, and the weights move to ``smoothing * factor +
  (1 - smoothing) / N`` (the factor-smooth update); one host read per interval. Domains not seen since the last
  update keep their factor's share of the previous weights.

Identical on all ranks (the sums are all-reduced before the update) and checkpointed (buffers). What was not read
from the paper, so kdrun's reading of a summary of it: the factor's form (``softmax`` of the loss ratio),
``smoothing`` (0.5) and ``interval`` (100); DDK measures the per-domain losses on a validation set, kdrun on the
training batches between updates (no extra pass).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import LossTerm
from kdrun.losses.tokens import _check, _token_mean, kl, log_probs


class DDKLoss(LossTerm):
    """DDK's distillation term and domain weights (see the module docstring).

    Inputs: ``student``, ``teacher`` (B, T, V) logits, ``target`` (B, T) labels, ``mask`` (B, T), ``domain`` (B,)
    (``batch.domain``: ``data.source.domains``). Args: ``num_domains``, ``temperature`` (1.0), ``interval`` (100),
    ``smoothing`` (0.5).
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, num_domains: int, temperature: float = 1.0, interval: int = 100, smoothing: float = 0.5) -> None:
        super().__init__()
        if int(num_domains) < 1 or int(interval) < 1 or not 0.0 <= smoothing <= 1.0 or temperature <= 0:
            raise ValueError(f"DDK: need num_domains >= 1, interval >= 1, smoothing in [0, 1], temperature > 0; got "
                             f"{num_domains}, {interval}, {smoothing}, {temperature}")
        self.num_domains, self.temperature = int(num_domains), float(temperature)
        self.interval, self.smoothing = int(interval), float(smoothing)
        self.register_buffer("sums", torch.zeros(3, self.num_domains, dtype=torch.float64))  # student CE, teacher CE, tokens
        self.register_buffer("weights", torch.full((self.num_domains,), 1.0 / self.num_domains, dtype=torch.float64))
        self.updates = 0

    def check_shapes(self, student: torch.Size, teacher: torch.Size, target: torch.Size, mask: torch.Size,  # type: ignore[override]
                     domain: torch.Size) -> None:
        _check("DDK", student, mask, ("teacher", teacher))
        if tuple(domain) != (student[0],) or tuple(target) != tuple(student[:2]):
            raise ValueError(f"DDK: 'domain' must be (B,) = {(student[0],)} and 'target' (B, T); got {tuple(domain)}, "
                             f"{tuple(target)} (batch.domain comes with data.source.domains)")

    def domain_weights(self) -> Tensor:
        """The current mixture over domains, (N,) float64 on the host (read by the training loader)."""
        return self.weights.detach().cpu()

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor, mask: Tensor, domain: Tensor) -> Tensor:  # type: ignore[override]
        teacher = teacher.detach()
        if self.training:
            with torch.no_grad():
                m = (mask != 0).double()
                y = target.clamp_min(0).unsqueeze(-1)
                ce = [(torch.logsumexp(z.float(), -1) - z.float().gather(-1, y).squeeze(-1)).double() for z in (student, teacher)]
                rows = torch.stack([(ce[0] * m).sum(1), (ce[1] * m).sum(1), m.sum(1)])  # (3, B)
                self.sums.index_add_(1, domain.long(), rows)
        scale = self.temperature ** 2
        return scale * _token_mean(lambda zs, zt: kl(log_probs(zt, self.temperature), log_probs(zs, self.temperature)),
                                   [student, teacher], mask, None)

    def on_step(self, step: int, total_steps: int) -> None:
        if step == 0 or step % self.interval:
            return
        sums = self.sums.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(sums)
        self.weights.copy_(self.updated(sums, self.weights))
        self.sums.zero_()
        self.updates += 1
        import logging

        logging.getLogger("kdrun").info("DDK step %d: domain weights %s", step,
                                        ", ".join(f"{w:.3f}" for w in self.weights.tolist()))

    def updated(self, sums: Tensor, weights: Tensor) -> Tensor:
        """The factor-smooth update of ``weights`` from per-domain sums (3, N): student CE, teacher CE, tokens."""
        seen = sums[2] > 0
        if not bool(seen.any()):
            return weights
        ratio = (sums[0] / sums[2].clamp_min(1)) / (sums[1] / sums[2].clamp_min(1)).clamp_min(1e-8)
        factor = torch.zeros_like(weights)
        factor[seen] = torch.softmax(ratio[seen], dim=0) * weights[seen].sum()  # unseen domains keep their share
        factor[~seen] = weights[~seen]
        factor = factor / factor.sum()
        return self.smoothing * factor + (1.0 - self.smoothing) / self.num_domains

    def extra_repr(self) -> str:
        return f"num_domains={self.num_domains}, interval={self.interval}, smoothing={self.smoothing}"




__all__ = ["DDKLoss"]
