"""Swing distillation (Li et al., "Swing Distillation: A Privacy-Preserving Knowledge Distillation Framework",
arXiv 2212.08349): the teacher's knowledge is withheld where a token is likely private.

Per scored position t with privacy score ``s_t`` in [0, 1] (the probability that the token carries private
information; ``batch.privacy`` from :class:`PrivacyScores`):

- the teacher's temperature rises with the score, ``T_t = T + (T_private - T) s_t``, flattening its distribution
  at private tokens;
- Gaussian noise of standard deviation ``noise * s_t`` is added to the teacher's logits there (the "noise injected
  into the soft targets"), drawn from the term's own generator (seeded, the same on every rank, checkpointed);
- the student learns ``KL(softmax(z_t / T_t + noise) || softmax(z_s / T))``, averaged over the scored tokens.

The paper states the two mechanisms, not their formulas as read here: the linear temperature schedule, the
Gaussian noise and the defaults (T 1, T_private 4, noise 1.0) are kdrun's. The measure of the paper is canary
exposure (``kdrun-exposure``).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdrun.component import DeviceGenerator
from kdrun.data.mix import BatchTransform
from kdrun.losses.base import LossTerm
from kdrun.losses.tokens import _check, kl, log_probs
from kdrun.losses.features import to_float


class PrivacyScores(BatchTransform):
    """A rule-based privacy scorer: 1.0 for every token whose text holds a digit or an ``@`` (numbers, e-mail
    addresses: the canaries' kind of secret), else 0.0, read from a per-vocabulary table on the device. As a batch
    transform it adds ``batch.privacy`` (B, L), the score of each position's *target* token (``labels``)."""

    def __init__(self, tokenizer: Any = None, characters: str = "0123456789@") -> None:
        self.characters = str(characters)
        self.table = torch.zeros(0)
        if tokenizer is not None:
            self.bind_tokenizer(tokenizer)

    def bind_tokenizer(self, tokenizer: Any) -> None:
        from kdrun.data.alignment import token_strings

        strings = token_strings(tokenizer)
        self.table = torch.tensor([1.0 if any(c in s for c in self.characters) else 0.0 for s in strings])

    def bind(self, ctx: Any, tokenizer: Any = None) -> None:  # the builder's hook for batch transforms
        if tokenizer is None:
            raise ValueError("PrivacyScores reads token strings: the data needs a tokenizer")
        self.bind_tokenizer(tokenizer)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        target = batch["labels"]
        if self.table.numel() == 0:
            raise ValueError("PrivacyScores: not bound to a tokenizer (the builder binds it to the data's)")
        if self.table.device != target.device:  # moved once, not per batch
            self.table = self.table.to(target.device)
        table = self.table
        return {**batch, "privacy": table[target.clamp(0, table.numel() - 1)] * (target >= 0)}

    def for_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return self(batch)


class SwingDistillationLoss(LossTerm):
    """Swing distillation's divergence (see the module docstring).

    Inputs: ``student``, ``teacher`` (B, T, V) logits, ``privacy`` (B, T) scores in [0, 1], ``mask`` (B, T).
    Args: ``temperature`` (1.0), ``private_temperature`` (4.0), ``noise`` (1.0), ``seed`` (0).
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, temperature: float = 1.0, private_temperature: float = 4.0, noise: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        if temperature <= 0 or private_temperature <= 0 or noise < 0:
            raise ValueError(f"Swing: temperatures must be > 0 and noise >= 0; got {temperature}, {private_temperature}, {noise}")
        self.temperature, self.private_temperature, self.noise = float(temperature), float(private_temperature), float(noise)
        self.rng = DeviceGenerator(seed)

    def check_shapes(self, student: torch.Size, teacher: torch.Size, privacy: torch.Size, mask: torch.Size) -> None:  # type: ignore[override]
        _check("Swing", student, mask, ("teacher", teacher))
        if tuple(privacy) != tuple(student[:2]):
            raise ValueError(f"Swing: 'privacy' must be (B, T) = {tuple(student[:2])}, got {tuple(privacy)} "
                             f"(batch_transform: kdrun.losses.swing.PrivacyScores adds batch.privacy)")

    def teacher_targets(self, teacher: Tensor, privacy: Tensor) -> Tensor:
        """Log-probabilities of the teacher's withheld targets: tempered per token and noised where private."""
        s = to_float(privacy).unsqueeze(-1)
        temp = self.temperature + (self.private_temperature - self.temperature) * s
        z = to_float(teacher) / temp
        if self.noise > 0 and self.training:
            gen = self.rng.draw(z.device)
            z = z + self.noise * s * torch.randn(z.shape, generator=gen, device=z.device)
        return torch.log_softmax(z, dim=-1)

    def forward(self, student: Tensor, teacher: Tensor, privacy: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        log_t = self.teacher_targets(teacher.detach(), privacy)
        per = kl(log_t, log_probs(student, self.temperature))
        m = (mask != 0).float()
        return (per * m).sum() / m.sum().clamp_min(1.0)

    def get_extra_state(self) -> dict[str, Any]:
        return {"rng": self.rng.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.rng.load_state_dict(state["rng"])


__all__ = ["PrivacyScores", "SwingDistillationLoss"]
