"""GRPO's policy-gradient term on groups of samples per prompt (Shao et al., "DeepSeekMath", arXiv 2402.03300), the
reinforcement half of KDRL (Xu et al., arXiv 2506.02208)."""
from __future__ import annotations

import torch
from torch import Tensor

from kdrun.losses.base import LossTerm
from kdrun.losses.preference import sequence_log_probs


def group_advantages(reward: Tensor, group_size: int, eps: float = 1e-4) -> Tensor:
    """``A_i = (r_i - mean_g r) / (std_g r + eps)`` over adjacent groups of ``group_size`` rows (std unbiased,
    eps 1e-4, as TRL's GRPOTrainer)."""
    r = reward.float().view(-1, group_size)
    return ((r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True) + eps)).view(-1)


class GRPOLoss(LossTerm):
    """``L = -(1/G) sum_i A_i (1/|o_i|) sum_t rho_{i,t}``, ``rho = pi(o_t) / sg(pi(o_t))``: the group-normalised
    reward ``A_i`` (:func:`group_advantages`) of each of the G samples of a prompt
    (:class:`kdrun.data.rollout.Rollout` with ``samples_per_prompt: G`` and a ``reward``) weights the gradient of its
    own length-normalised log-likelihood. One update per rollout, so the ratio is 1 and PPO's clipping never
    acts; old-policy log-probabilities for several updates per rollout are not kept (not built).

    Inputs: ``logits`` (B, L, V) the student's, ``target`` (B, L) the sampled tokens (``batch.labels``), ``mask``
    (B, L) (``batch.token_mask``), ``reward`` (B,) (``batch.reward``). Args: ``group_size`` G (the rollout's
    ``samples_per_prompt``), ``eps`` (1e-4).
    """

    def __init__(self, group_size: int = 4, eps: float = 1e-4, chunk_rows: int = 4) -> None:
        super().__init__()
        if int(group_size) < 2:
            raise ValueError(f"GRPO: group_size must be at least 2 (advantages compare samples of one prompt), got {group_size}")
        self.group_size, self.eps, self.chunk_rows = int(group_size), float(eps), int(chunk_rows)

    def check_shapes(self, logits: torch.Size, target: torch.Size, mask: torch.Size, reward: torch.Size) -> None:  # type: ignore[override]
        if len(logits) != 3 or tuple(target) != tuple(logits[:2]) or tuple(mask) != tuple(logits[:2]):
            raise ValueError(f"GRPO: needs logits (B, L, V), target and mask (B, L); got {tuple(logits)}, {tuple(target)}, "
                             f"{tuple(mask)}")
        if tuple(reward) != (logits[0],) or logits[0] % self.group_size:
            raise ValueError(f"GRPO: 'reward' must be (B,) with B a multiple of group_size={self.group_size} (the rollout's "
                             f"samples_per_prompt and a reward: batch.reward); got {tuple(reward)} for {logits[0]} rows")

    def forward(self, logits: Tensor, target: Tensor, mask: Tensor, reward: Tensor) -> Tensor:  # type: ignore[override]
        adv = group_advantages(reward.detach(), self.group_size, self.eps)
        lengths = (mask != 0).sum(dim=-1).clamp_min(1)
        mean_logp = sequence_log_probs(logits, target, mask, self.chunk_rows) / lengths
        ratio = torch.exp(mean_logp - mean_logp.detach())  # 1 in value; its gradient is that of the mean log-probability
        return -(adv * ratio).mean()


__all__ = ["GRPOLoss", "group_advantages"]
