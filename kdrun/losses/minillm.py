"""MiniLLM's sequence-level reverse KL on the student's own samples (Gu et al., "MiniLLM: Knowledge Distillation of
Large Language Models", ICLR 2024), as a policy gradient with its single-step term.

On a rollout ``y ~ q`` (:class:`kdrun.data.rollout.Rollout`), with the per-token reward ``r_t = log p(y_t | y_<t) -
log q(y_t | y_<t)`` (teacher ``p``, student ``q``; no gradient):

- **single-step term**: ``KL(q_t || p_t)`` at every position, exactly over the vocabulary (the gradient of the
  expected immediate reward, the paper's variance reduction);
- **long-term term**: ``-sg(R_{t+1}) log q(y_t)``, ``R_{t+1} = sum_{t' > t} gamma^(t' - t - 1) r_t'`` the discounted
  return of the tokens after t, divided by their number when ``length_norm`` (MiniLLM's ``--length-norm``).

The value is the mean over the scored tokens of the sum of both. Defaults from the authors' GPT-2 scripts and
arguments: ``gamma`` 0.95, ``length_norm`` true.

Teacher-mixed sampling (the authors' ``--teacher-mixed-alpha`` 0.2): the rollout draws from ``alpha p + (1 - alpha)
q`` (:class:`kdrun.data.rollout.Rollout` ``teacher_mix``) and writes the per-token importance weight
``w_t = q(y_t) / (alpha p(y_t) + (1 - alpha) q(y_t))`` (``batch.mix_weight``), computed at sampling time, as the
authors' sampler computes it; with the ``weight`` input each token's two terms are multiplied by ``sg(w_t)``. The
rewards stay ``log p - log q`` at the drawn tokens. Whether the authors also weight the single-step term was not
read; kdrun weights both (the states are drawn from the mixture too).

PPO's inner epochs (the authors' ``--ppo-epochs`` 4, clip 0.2, ``--reward-scaling`` 0.5): a rollout trained for several
steps (:class:`kdrun.data.rollout.PPORollout`) carries ``old_logp``, the sampled tokens' log-probabilities when they
were sampled. With the ``old_logp`` input the long-term term becomes PPO's clipped surrogate,
``max(-rho_t A_t, -clip(rho_t, 1 - clip, 1 + clip) A_t)`` with ``rho_t = q(y_t) / q_old(y_t)`` and
``A_t = sg(R_{t+1}) / reward_scaling``; at ``rho = 1`` its gradient is the plain term's. The single-step term stays
exact. Not built: the language-modelling loss on pre-training text.

Memory: the returns are one (L, L) matrix product per micro-batch; the per-position terms run in chunks like
:class:`~kdrun.losses.tokens.TokenDivergence`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import LossTerm
from kdrun.losses.tokens import _check, _check_chunk, _token_mean, kl, log_probs


def discounted_returns(r: Tensor, mask: Tensor, gamma: float, length_norm: bool) -> Tensor:
    """(B, L) ``R_{t+1} = sum_{t' > t} gamma^(t' - t - 1) m_t' r_t'`` (divided by ``sum_{t' > t} m_t'`` when
    ``length_norm``; 0 where no scored token follows)."""
    length = r.shape[1]
    t = torch.arange(length, device=r.device)
    gap = t.view(-1, 1) - t.view(1, -1) - 1  # [t', t]: t' - t - 1
    later = gap >= 0
    weights = torch.where(later, torch.full(gap.shape, gamma, dtype=r.dtype, device=r.device) ** gap.clamp_min(0),
                          torch.zeros((), dtype=r.dtype, device=r.device))
    m = (mask != 0).to(r.dtype)
    returns = (r * m) @ weights
    if length_norm:
        returns = returns / (m @ later.to(r.dtype)).clamp_min(1.0)
    return returns


class MiniLLMLoss(LossTerm):
    """MiniLLM's policy gradient for the sequence-level reverse KL (see the module docstring).

    Inputs: ``student``, ``teacher`` (B, T, V) logits, ``target`` (B, T) the sampled tokens (``batch.labels``),
    ``mask`` (B, T), optional ``weight`` (B, T) per-token importance weights (``batch.mix_weight`` of teacher-mixed
    rollouts), optional ``old_logp`` (B, T) (``batch.old_logp`` of :class:`~kdrun.data.rollout.PPORollout`: the clipped
    surrogate). Args: ``gamma`` (0.95), ``length_norm`` (true), ``clip`` (0.2), ``reward_scaling`` (1.0; the authors'
    scripts 0.5), ``chunk_size``.
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, gamma: float = 0.95, length_norm: bool = True, chunk_size: int | None = 1024, clip: float = 0.2,
                 reward_scaling: float = 1.0) -> None:
        super().__init__()
        if not 0.0 <= gamma <= 1.0 or not 0.0 < clip < 1.0 or reward_scaling <= 0:
            raise ValueError(f"MiniLLM: need gamma in [0, 1], clip in (0, 1) and reward_scaling > 0; got {gamma}, {clip}, "
                             f"{reward_scaling}")
        self.gamma, self.length_norm = float(gamma), bool(length_norm)
        self.clip, self.reward_scaling = float(clip), float(reward_scaling)
        self.chunk_size = _check_chunk(chunk_size)

    def check_shapes(self, student: torch.Size, teacher: torch.Size, target: torch.Size, mask: torch.Size,  # type: ignore[override]
                     weight: torch.Size | None = None, old_logp: torch.Size | None = None) -> None:
        _check("MiniLLM", student, mask, ("teacher", teacher))
        for name, shape, what in (("weight", weight, "batch.mix_weight of a Rollout with teacher_mix"),
                                  ("old_logp", old_logp, "batch.old_logp of a PPORollout")):
            if shape is not None and tuple(shape) != tuple(student[:2]):
                raise ValueError(f"MiniLLM: '{name}' {tuple(shape)} must be one value per position {tuple(student[:2])} "
                                 f"({what})")
        if tuple(target) != tuple(student[:2]):
            raise ValueError(f"MiniLLM: 'target' {tuple(target)} must be the sampled tokens (batch, positions) of logits "
                             f"{tuple(student)} (batch.labels of Rollout batches)")

    @torch.no_grad()
    def rewards(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        """(B, T) ``log p(y_t) - log q(y_t)`` at the sampled tokens."""
        def logp(z: Tensor) -> Tensor:
            z = z.float()
            return z.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)

        return logp(teacher) - logp(student)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor, mask: Tensor,  # type: ignore[override]
                weight: Tensor | None = None, old_logp: Tensor | None = None) -> Tensor:
        teacher = teacher.detach()
        r = self.rewards(student, teacher, target)
        future = discounted_returns(r, mask, self.gamma, self.length_norm) / self.reward_scaling
        w = torch.ones_like(future) if weight is None else weight.detach().to(future.dtype)
        lo, hi = 1.0 - self.clip, 1.0 + self.clip

        def per_token(zs: Tensor, zt: Tensor, y: Tensor, ret: Tensor, wt: Tensor, *old: Tensor) -> Tensor:
            log_s = log_probs(zs)
            log_y = log_s.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            if old:  # PPO's clipped surrogate on the ratio to the sampling weights
                rho = (log_y - old[0].float()).exp()
                long_term = torch.maximum(-rho * ret, -rho.clamp(lo, hi) * ret)
            else:
                long_term = -ret * log_y
            return wt * (kl(log_s, log_probs(zt)) + long_term)

        extra = [] if old_logp is None else [old_logp.detach()]
        return _token_mean(per_token, [student, teacher, target, future, w, *extra], mask, self.chunk_size)


__all__ = ["MiniLLMLoss", "discounted_returns"]
