"""OFA-KD: one-for-all knowledge distillation between heterogeneous architectures (Hao et al., "One-for-All:
Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation", NeurIPS 2023; code
Hao840/OFAKD, ``distillers/ofa.py``)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext
from kdrun.losses.base import LossTerm
from kdrun.names import owner_of


def ofa_loss(student: Tensor, teacher: Tensor, target: Tensor, eps: float, temperature: float = 1.0) -> Tensor:
    """The adaptive target-enhancement loss, ``1/B sum_i sum_c -[(p_t,ic + m_ic)^eps - m_ic] log p_s,ic`` with
    ``m`` the one-hot label mask (eps = 1: soft cross-entropy to the teacher; eps > 1 raises the label's share)."""
    p_s = F.log_softmax(student.float() / temperature, dim=1)
    p_t = F.softmax(teacher.float().detach() / temperature, dim=1)
    mask = F.one_hot(target, student.shape[1]).to(p_t.dtype)
    return (-((p_t + mask) ** eps - mask) * p_s).sum(dim=1).mean()


class SepConv(nn.Sequential):
    """OFA's down-sampling block: depthwise 3x3 (stride 2) -> pointwise -> BN -> ReLU -> depthwise 3x3 -> pointwise
    (to ``c_out``) -> BN -> ReLU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False), nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in), nn.ReLU(inplace=False),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False), nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out), nn.ReLU(inplace=False))


class _TokenMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def cnn_branch(channels: int, downsamples: int, width: int, num_classes: int) -> nn.Sequential:
    """An exit branch for a (B, C, H, W) stage: ``downsamples`` SepConvs doubling the channels (the last one to
    ``width``), or a 1x1 conv to ``width`` for the last stage; global average pooling; a linear classifier."""
    blocks: list[nn.Module] = []
    if downsamples == 0:
        blocks.append(nn.Conv2d(channels, width, 1))
    c = channels
    for i in range(downsamples):
        out = width if i == downsamples - 1 else c * 2
        blocks.append(SepConv(c, out))
        c *= 2
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))


def token_branch(dim: int, blocks: int, num_classes: int, heads: int = 4) -> nn.Sequential:
    """An exit branch for (B, N, D) patch tokens: ``blocks`` pre-norm transformer blocks (kdrun's ViT block,
    ``heads`` heads), the mean over tokens, a linear classifier (no patch merging: see :class:`OFALoss`)."""
    from kdrun.models.vit import Block

    return nn.Sequential(*[Block(dim, heads) for _ in range(blocks)], _TokenMean(), nn.Linear(dim, num_classes))


def _init(module: nn.Module) -> None:
    """OFA's branch initialisation: Kaiming (fan out) convs, unit BatchNorms, truncated-normal (0.02) linears."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class OFALoss(LossTerm):
    """OFA-KD: exit branches on the student's stages project their features into the logit space, where the
    architecture-specific parts are gone, and every branch and the student's own logits learn the teacher's
    prediction through the adaptive target-enhancement loss (:func:`ofa_loss`).

    Returns ``{"final": L(z_s), "branches": branch_weight * sum_k L(branch_k(stage_k))}``, which OFA weights as
    ``kd_loss_weight`` and ``ofa_loss_weight`` (both 1 by default, as here); CE is a separate term.

    Branches (built in ``setup`` from the stage shapes, trained with the student, not exported with it):
    - a CNN stage (B, C, H, W) k of K: K - k SepConv down-samplers doubling the channels, the last one to
      ``max(D_s, D_t)`` (the widths of the student's last stage and of the teacher's ``feat``), a 1x1 conv for the
      last stage; then pooling and a linear classifier (OFA's code);
    - a transformer stage (B, N, D) k of K: max(K - k, 1) pre-norm blocks of width D with 4 heads, the token mean,
      a linear classifier. OFA merges patches down to a 7x7 grid first; for CIFAR's 8x8 grid it merges none
      (log2(8 / 7) < 1); patch merging for larger grids is not built (an error says so).

    Args:
        num_classes: C. eps: the exponent, one number or one per branch stage plus one for the final logits
            (default 1; OFA's README uses 1.5 for DeiT-T -> ResNet18 on ImageNet). temperature: default 1.
        branch_stages: 1-based stages that get a branch (default all, OFA's [1, 2, 3, 4] for 4 stages).
        branch_weight: default 1.

    Inputs: ``stages`` (the student's stage list, ``student.stages``), ``student`` (its logits), ``teacher``
    (the teacher's logits), ``target`` (B,) labels or (B, C) soft targets (their argmax, as OFA does).
    """

    def __init__(self, num_classes: int, eps: float | Sequence[float] = 1.0, temperature: float = 1.0,
                 branch_stages: Sequence[int] | None = None, branch_weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes, self.temperature, self.branch_weight = int(num_classes), float(temperature), float(branch_weight)
        self.eps_arg = eps
        self.branch_stages = None if branch_stages is None else [int(s) for s in branch_stages]
        self.branches = nn.ModuleDict()
        self.eps: list[float] = []

    def setup(self, ctx: BuildContext) -> None:
        shapes = list(ctx.shapes["stages"]) if isinstance(ctx.shapes["stages"], (list, tuple)) else [ctx.shapes["stages"]]
        k_total = len(shapes)
        stages = self.branch_stages or list(range(1, k_total + 1))
        if any(not 1 <= s <= k_total for s in stages):
            raise ValueError(f"OFA: branch_stages {stages} must be in 1..{k_total} (the student has {k_total} stages)")
        teacher = owner_of(ctx.inputs["teacher"])
        t_feat = ctx.tensor_shapes.get(f"{teacher}.feat")
        last = shapes[-1]
        d_s = int(last[1] if len(last) == 4 else last[-1])
        width = max(d_s, int(t_feat[-1])) if t_feat is not None else d_s
        for s in stages:
            shape = shapes[s - 1]
            if len(shape) == 4:
                branch = cnn_branch(int(shape[1]), k_total - s, width, self.num_classes)
            elif len(shape) == 3:
                grid = int(round(int(shape[1]) ** 0.5))
                if grid >= 14:
                    raise ValueError(f"OFA: stage {s}'s {grid}x{grid} token grid needs patch merging to 7x7, which kdrun "
                                     f"does not build; read a coarser stage or use a CNN student")
                branch = token_branch(int(shape[2]), max(k_total - s, 1), self.num_classes)
            else:
                raise ValueError(f"OFA: stage {s} must be (B, C, H, W) or (B, tokens, D), got {tuple(shape)}")
            _init(branch)
            self.branches[str(s)] = branch
        eps = self.eps_arg
        self.eps = [float(e) for e in eps] if isinstance(eps, (list, tuple)) else [float(eps)] * (len(stages) + 1)
        if len(self.eps) != len(stages) + 1:
            raise ValueError(f"OFA: eps has {len(self.eps)} values; give one, or one per branch stage ({len(stages)}) "
                             f"plus one for the final logits")

    def check_shapes(self, stages, student: torch.Size, teacher: torch.Size, target: torch.Size) -> None:  # type: ignore[override]
        if tuple(student) != tuple(teacher) or len(student) != 2:
            raise ValueError(f"OFA: student and teacher logits must be equal (batch, classes), got {tuple(student)} and "
                             f"{tuple(teacher)}")

    def forward(self, stages, student: Tensor, teacher: Tensor, target: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        stages = list(stages) if isinstance(stages, (list, tuple)) else [stages]
        labels = target.argmax(dim=1) if target.is_floating_point() else target.long()
        branch = torch.zeros((), device=student.device)
        for i, (s, head) in enumerate(self.branches.items()):
            branch = branch + ofa_loss(head(stages[int(s) - 1]), teacher, labels, self.eps[i], self.temperature)
        final = ofa_loss(student, teacher, labels, self.eps[-1], self.temperature)
        return {"final": final, "branches": self.branch_weight * branch}
