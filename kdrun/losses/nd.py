"""ND: the feature norm and direction loss (Wang et al., "Improving Knowledge Distillation via Regularizing
Feature Norm and Direction", arXiv 2305.17007; code WangYZ1608/Knowledge-Distillation-via-ND)."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext
from kdrun.losses.base import LossTerm


def nd_loss(student: Tensor, teacher: Tensor, centers: Tensor, target: Tensor) -> Tensor:
    """``1/B sum_i [1 - <s_i, c_{y_i} / ||c_{y_i}||> / max(||s_i||, ||t_i||)]`` (float32)."""
    s, t = student.float(), teacher.float()
    direction = F.normalize(centers.float(), dim=1)[target]  # (B, D): the unit class centre of each sample's label
    norm = torch.maximum(s.norm(dim=1), t.norm(dim=1))
    return (1.0 - (s * direction).sum(dim=1) / norm).mean()


class NDLoss(LossTerm):
    """ND loss: push the direction of the student's embedding towards the teacher's class centre and its norm
    up to at least the teacher's.

    With ``s_i`` the student's embedding (the penultimate feature, ``student.feat``), ``t_i`` the teacher's,
    ``c_y`` the mean of the teacher's embeddings over the training samples of class ``y`` and
    ``e_y = c_y / ||c_y||``:

        ``L_nd = 1/B sum_i [1 - (e_{y_i} . s_i) / max(||s_i||, ||t_i||)]``

    (the authors' ``DirectNormLoss``; the ``nd_loss_factor`` of their scripts is the term's ``weight``).
    The class centres are computed by the engine before the first stage that uses the term trains: the
    frozen teacher in eval mode over the training set (kdrun: in order, without augmentation; the authors
    ship their centres as ``center_emb_train.json`` made by a script over the training split), kept in the
    ``centers`` buffer (so checkpoints hold them) and written to ``<run dir>/class_means/<term>.pt``.

    When the student's embedding is narrower or wider than the teacher's (wrn_40_1 from wrn_40_2, MobileNetV2
    or ShuffleNets from ResNets) it first goes through the authors' ``EmbTrans`` projection,
    ``BatchNorm1d -> Dropout(0.5) -> Linear(D_s, D_t)`` (BatchNorm weight 1, biases 0), trained with the
    student (the term's parameters join the stage's optimizer). The student's logits are unchanged.

    Args:
        num_classes: classes of the training set (``${data.num_classes}``).
        projection: ``auto`` (only when the widths differ, as the authors do), ``true`` or ``false``.
        dropout: of the projection (default 0.5).

    Inputs: ``student`` (B, D_s), ``teacher`` (B, D_t), ``target`` (B,) class indices.
    """

    def __init__(self, num_classes: int, projection: str | bool = "auto", dropout: float = 0.5) -> None:
        super().__init__()
        if projection not in ("auto", True, False):
            raise ValueError(f"ND: projection must be auto, true or false, got {projection!r}")
        if int(num_classes) < 1:
            raise ValueError(f"ND: num_classes must be at least 1, got {num_classes}")
        self.num_classes, self.projection_mode, self.dropout = int(num_classes), projection, float(dropout)
        self.projection: nn.Module | None = None
        self.register_buffer("centers", torch.zeros(0))
        self.register_buffer("has_centers", torch.zeros((), dtype=torch.bool))

    def check_shapes(self, student: torch.Size, teacher: torch.Size, target: torch.Size) -> None:  # type: ignore[override]
        if len(student) != 2 or len(teacher) != 2:
            raise ValueError(f"ND: student and teacher embeddings must be (batch, features), got {tuple(student)} and "
                             f"{tuple(teacher)} (read the pooled feature, e.g. student.feat and teacher.feat)")
        if len(target) != 1 or target[0] != student[0]:
            raise ValueError(f"ND: target must be (batch,) class indices, got {tuple(target)} (soft targets of mixup "
                             f"have no class centre)")
        if student[1] != teacher[1] and self.projection is None:
            raise ValueError(f"ND: the student's embedding has {student[1]} features and the teacher's {teacher[1]}: "
                             f"set projection: auto (or true)")

    def setup(self, ctx: BuildContext) -> None:
        d_s, d_t = int(ctx.shapes["student"][1]), int(ctx.shapes["teacher"][1])
        if self.projection_mode is True or (self.projection_mode == "auto" and d_s != d_t):
            self.projection = nn.Sequential(nn.BatchNorm1d(d_s), nn.Dropout(self.dropout), nn.Linear(d_s, d_t))
            nn.init.zeros_(self.projection[2].bias)
        self.centers = torch.zeros(self.num_classes, d_t)

    def class_mean_inputs(self) -> tuple[str, ...]:
        return () if bool(self.has_centers) else ("teacher",)

    def set_class_means(self, means: Mapping[str, Tensor]) -> None:
        c = means["teacher"]
        if tuple(c.shape) != tuple(self.centers.shape):
            raise ValueError(f"ND: class centres of shape {tuple(c.shape)}, expected {tuple(self.centers.shape)} "
                             f"(num_classes {self.num_classes})")
        self.centers.copy_(c)
        self.has_centers.fill_(True)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        if self.projection is not None:
            student = self.projection(student.float())
        return nd_loss(student, teacher, self.centers, target.long())
