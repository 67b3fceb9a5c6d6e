"""Adapters that combine several teachers' outputs into one target.

Configured under ``adapters`` with ``inputs: {logits: [t1.logits, t2.logits, ...]}`` (any number of
named teachers); loss terms then read ``adapters.<name>`` like a single teacher's logits.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def _stack(logits: list[Tensor], who: str) -> Tensor:
    if not isinstance(logits, (list, tuple)) or len(logits) < 1:
        raise ValueError(f"{who}: 'logits' must be a list of the teachers' logits, e.g. [t1.logits, t2.logits]")
    shapes = {tuple(t.shape) for t in logits}
    if len(shapes) != 1:
        raise ValueError(f"{who}: the teachers' logits differ in shape: {sorted(shapes)}")
    return torch.stack(list(logits), dim=0)  # (K, B, C)


class LogitEnsemble(nn.Module):
    """Average or weighted average of K teachers' logits: ``z = sum_k w_k z_k / sum_k w_k``.

    The multi-teacher baseline of "Efficient Knowledge Distillation from an Ensemble of Teachers"
    (Fukuda et al., Interspeech 2017) and of later multi-teacher papers (e.g. CA-MKD's "AVER").

    Args:
        weights: one non-negative weight per teacher (normalised to sum 1); null = plain average.
    """

    def __init__(self, weights: list[float] | None = None) -> None:
        super().__init__()
        if weights is not None:
            w = torch.as_tensor([float(v) for v in weights])
            if w.numel() == 0 or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"LogitEnsemble: weights must be non-negative with a positive sum, got {list(weights)}")
            self.register_buffer("weights", w / w.sum(), persistent=False)
        else:
            self.weights = None

    def forward(self, logits: list[Tensor]) -> Tensor:
        z = _stack(logits, "LogitEnsemble")
        if self.weights is None:
            return z.mean(dim=0)
        if self.weights.numel() != z.shape[0]:
            raise ValueError(f"LogitEnsemble: {self.weights.numel()} weights for {z.shape[0]} teachers")
        return torch.einsum("k,kbc->bc", self.weights.to(z.dtype), z)


class TeacherRouter(nn.Module):
    """A trainable router that weights K teachers per sample: ``z_i = sum_k g_ik z_ik`` with
    ``g_i = softmax(W f_i + b)`` over teachers, where ``f_i`` is a feature of sample i (the
    student's pooled feature, or any tap).

    Per-sample mixtures of teachers follow mixture-of-experts gating (Jacobs et al. 1991) as used
    for mixtures of specialised teachers; the router is trained by the loss terms of the optimizer
    group that lists it (``co_train: {router: {train: [adapters.<name>], losses: [router_ce]}}``,
    e.g. cross-entropy of the routed logits with the labels), so it learns which teacher is right
    for which sample. ``f`` is detached by default: the router does not train the network it
    reads. Starts as the plain average (zero-initialised gate).

    Args:
        in_features: size of ``features`` (``auto``: from the probe forward).
        num_teachers: K.
        detach_features: stop gradients into ``features`` (default True).

    ``forward(features, logits)`` -> routed logits (B, C). ``weights(features)`` -> g (B, K).
    """

    def __init__(self, in_features: int, num_teachers: int, detach_features: bool = True) -> None:
        super().__init__()
        if num_teachers < 1:
            raise ValueError(f"TeacherRouter: num_teachers must be at least 1, got {num_teachers}")
        self.gate = nn.Linear(int(in_features), int(num_teachers))
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.num_teachers = int(num_teachers)
        self.detach_features = bool(detach_features)

    def weights(self, features: Tensor) -> Tensor:
        f = features.flatten(1)
        if self.detach_features:
            f = f.detach()
        return torch.softmax(self.gate(f.to(self.gate.weight.dtype)), dim=-1)

    def forward(self, features: Tensor, logits: list[Tensor]) -> Tensor:
        z = _stack(logits, "TeacherRouter")
        if z.shape[0] != self.num_teachers:
            raise ValueError(f"TeacherRouter: built for {self.num_teachers} teachers, got {z.shape[0]} logits")
        g = self.weights(features).to(z.dtype)  # (B, K)
        return torch.einsum("bk,kbc->bc", g, z)
