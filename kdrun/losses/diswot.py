"""DisWOT's two training-free similarity metrics, used as distillation losses (Dong, Li & Wei, "DisWOT: Student
Architecture Search for Distillation WithOut Training", CVPR 2023), and the scores of its student search
(:mod:`kdrun.search`)."""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from kdrun.component import BuildContext
from kdrun.losses.base import LossTerm
from kdrun.losses.features import full_precision
from kdrun.losses.relations import SPLoss
from kdrun.names import owner_of


def class_activation_maps(features: Tensor, weight: Tensor) -> Tensor:
    """The class activation maps of a batch, ``G_n = sum_c w_nc A^c`` (Zhou et al., CVPR 2016), flattened over
    the batch and positions: (B, C, H, W) features and an (N, C) classifier weight give (N, B * H * W)."""
    a = features.flatten(2).transpose(0, 1).flatten(1)  # (C, B * H * W)
    return weight @ a


def _classifier(model: nn.Module, classes: int, path: str | None, name: str) -> nn.Linear:
    """The model's classifier: the module at ``path``, or the last ``nn.Linear`` with ``classes`` outputs."""
    if path is not None:
        module = dict(model.named_modules()).get(path)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"DisWOT: {name} has no linear layer at '{path}'")
        return module
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    if not linears:
        raise ValueError(f"DisWOT: {name} has no nn.Linear with {classes} outputs: name its classifier "
                         f"({name}_classifier: module.path)")
    return linears[-1]


class DisWOTSemanticLoss(LossTerm):
    """DisWOT's semantic similarity: class activation maps of the pre-pooling features through each model's
    own classifier weights, compared as class-by-class correlations.

    ``G = W A`` (N classes x B*H*W, :func:`class_activation_maps`), ``Gs = G G^T`` row-normalised (N x N, SP's similarity), and

        ``M_s = ||Gs_T - Gs_S||_F``,  ``L = M_s / N^2``  (the paper's ``L_Ms = ||.||_2 / c^2``).

    The student's classifier receives the gradient (it is the student's own weight, read live every step); the
    teacher's is frozen. The maps need no common spatial size or width: the N x N matrices are compared.
    Row normalisation follows SP (the paper writes ``/||G G^T||_2``); the norm is not squared, as written.

    Args:
        student_classifier, teacher_classifier: module paths of the classifiers, or null (the last
            ``nn.Linear`` whose outputs are the classes).
        normalize_loss: divide by N^2 (default true); false gives the search metric ``M_s`` itself.

    Inputs: ``student``, ``teacher``: (B, C, H, W) features before global pooling (``last_stage``).
    """

    def __init__(self, student_classifier: str | None = None, teacher_classifier: str | None = None,
                 normalize_loss: bool = True) -> None:
        super().__init__()
        self.paths = {"student": student_classifier, "teacher": teacher_classifier}
        self.normalize_loss = bool(normalize_loss)
        self._fc: dict[str, nn.Linear] = {}  # the models' own layers: not registered, so not saved or optimised here

    def setup(self, ctx: BuildContext) -> None:
        for arg in ("student", "teacher"):
            owner = owner_of(ctx.inputs[arg])
            logits = ctx.tensor_shapes.get(f"{owner}.logits")
            if logits is None:
                raise ValueError(f"DisWOT: {owner} publishes no logits to find its classifier by")
            self._fc[arg] = _classifier(ctx.model(owner), int(logits[-1]), self.paths[arg], owner)

    def __deepcopy__(self, memo):  # the build's trial forward copies the term: share the models' layers
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for k, v in self.__dict__.items():
            new.__dict__[k] = v if k == "_fc" else copy.deepcopy(v, memo)
        return new

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        if len(student) != 4 or len(teacher) != 4:
            raise ValueError(f"DisWOT semantic: features must be (batch, channels, height, width) maps before pooling, "
                             f"got {tuple(student)} and {tuple(teacher)} (read last_stage)")
        for arg, shape in (("student", student), ("teacher", teacher)):
            fc = self._fc.get(arg)
            if fc is not None and fc.in_features != shape[1]:
                raise ValueError(f"DisWOT semantic: the {arg}'s classifier reads {fc.in_features} features, its map has "
                                 f"{shape[1]} channels: read the map the classifier pools")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        with full_precision(student):
            g_s = SPLoss.similarity(class_activation_maps(student.float(), self._fc["student"].weight.float()))
            g_t = SPLoss.similarity(class_activation_maps(teacher.float().detach(), self._fc["teacher"].weight.float().detach()))
            m = (g_t - g_s).norm()
            return m / (g_s.shape[0] ** 2) if self.normalize_loss else m


class DisWOTRelationLoss(LossTerm):
    """DisWOT's relation similarity: the SP batch similarity of the pre-pooling features,

        ``A = f f^T`` row-normalised (B x B, f the flattened maps),  ``M_r = ||A_T - A_S||_F``,  ``L = M_r / B^2``

    (the paper's ``L_Mr = ||.||_2 / b^2``, the norm not squared as written; SP's own loss squares it).

    Args:
        normalize_loss: divide by B^2 (default true); false gives the search metric ``M_r``.

    Inputs: ``student``, ``teacher``: (B, ...) features (``last_stage``).
    """

    def __init__(self, normalize_loss: bool = True) -> None:
        super().__init__()
        self.normalize_loss = bool(normalize_loss)

    def check_shapes(self, student: torch.Size, teacher: torch.Size) -> None:  # type: ignore[override]
        if student[0] != teacher[0]:
            raise ValueError(f"DisWOT relation: batch sizes differ, {tuple(student)} and {tuple(teacher)}")

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:  # type: ignore[override]
        with full_precision(student):
            a_s = SPLoss.similarity(student.float().flatten(1))
            a_t = SPLoss.similarity(teacher.float().detach().flatten(1))
            m = (a_t - a_s).norm()
            b = student.shape[0]
            return m / (b * b) if self.normalize_loss else m
