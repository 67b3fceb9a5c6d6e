"""TGeo-KD: a per-sample fusion ratio between distillation and cross-entropy, learned on held-out data.

Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu, "Less or More From Teacher: Exploiting Trilateral Geometry For
Knowledge Distillation", ICLR 2024 (arXiv 2312.15112). From the paper's abstract: a small network maps
the *intra-sample* relations between the student's prediction S, the teacher's prediction T and the
ground truth G, and the *inter-sample* relation to the teacher's average prediction over the sample's
class T̄, to a sample-wise ratio alpha_i, trained by bilevel optimisation:

    L(theta; phi) = 1/B sum_i [ alpha_i KD_i + (1 - alpha_i) CE_i ],   alpha_i = sigmoid(h_phi(r_i)),
    KD_i = T^2 KL(softmax(t_i / T) || softmax(s_i / T)),   CE_i = -log softmax(s_i)_{y_i}.

The student minimises L with alpha fixed (the ratio carries no gradient into theta). The fusion network
phi minimises the cross-entropy of the student one step ahead on a held-out meta batch (x', y'):

    theta' = theta - eta grad_theta L(theta; phi),   phi <- Adam step on grad_phi CE(f(x'; theta'), y'),

with eta the student's current learning rate (the look-ahead of learning-to-reweight methods, e.g.
Meta-Weight-Net, Shu et al., NeurIPS 2019), run before every ``meta_every``-th optimizer step through
the engine's outer step (:class:`kdrun.component.OuterStep`), the meta set from ``data.meta_split``.

What the paper's abstract does not fix, kdrun's choices (not the paper's, which were not read):

- the relation features r_i: the difference vectors p_s - p_t, p_s - g, p_t - g and p_t - t̄_{y_i}
  with their L2 norms (4 C + 4 numbers), from the predictions at temperature 1 (p = softmax(z)),
  g the one-hot label, t̄_c the teacher's mean prediction over the training samples of class c (the
  engine's class-means pass, exact for a frozen teacher); the features carry no gradient;
- h_phi: Linear(4 C + 4, hidden) -> ReLU -> Linear(hidden, 1), hidden 64, the output bias 0 (alpha
  starts near 1/2);
- the meta optimiser: Adam, lr 1e-3, betas (0.9, 0.999), on every step; the look-ahead is plain SGD
  at the student's learning rate (momentum and weight decay left out of the virtual step);
- KD's temperature 4 (the CIFAR-100 benchmark's).

Under data parallelism each rank looks ahead on its own shard and the fusion network's gradients are
averaged over ranks, so it stays identical everywhere. The fusion network and its Adam state are the
term's parameters and buffers: in checkpoints, not in the stage's optimizer, not in the exported student.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext, OuterStep
from kdrun.losses.adam import adam_step, add_adam_state
from kdrun.losses.base import LossTerm, model_input_names, require_same_shape
from kdrun.losses.features import to_float
from kdrun.names import owner_of


class TGeoKDLoss(LossTerm):
    """TGeo-KD's sample-wise fusion of KD and CE (see the module docstring for the formula and what is
    kdrun's choice).

    Args:
        num_classes: C. temperature: KD's T (4). hidden: the fusion network's width (64). meta_lr:
        its Adam learning rate (1e-3). meta_every: one outer step every this many optimizer steps (1).
    Inputs: ``student`` (B, C) logits, ``teacher`` (B, C) logits, ``target`` (B,) labels.
    """

    wants_outer_step = True

    def __init__(self, num_classes: int, temperature: float = 4.0, hidden: int = 64, meta_lr: float = 1e-3,
                 meta_every: int = 1, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__()
        if temperature <= 0 or meta_lr <= 0 or int(meta_every) < 1 or int(hidden) < 1:
            raise ValueError(f"tgeo-kd: temperature and meta_lr must be positive, hidden and meta_every at least 1; got "
                             f"{temperature}, {meta_lr}, {hidden}, {meta_every}")
        self.num_classes, self.temperature = int(num_classes), float(temperature)
        self.meta_lr, self.meta_every, self.betas, self.eps = float(meta_lr), int(meta_every), tuple(betas), float(eps)
        c = self.num_classes
        self.fusion = nn.Sequential(nn.Linear(4 * c + 4, int(hidden)), nn.ReLU(), nn.Linear(int(hidden), 1))
        nn.init.zeros_(self.fusion[2].bias)
        add_adam_state(self, list(self.fusion.parameters()))
        self.register_buffer("class_mean_prediction", torch.zeros(c, c))
        self.register_buffer("has_class_means", torch.zeros((), dtype=torch.bool))
        self.names: dict[str, str] = {}
        self.last_meta_loss: Tensor | None = None

    # ------------------------------------------------------------------ build and statistics
    def setup(self, ctx: BuildContext) -> None:
        self.names = model_input_names(ctx, "tgeo-kd")

    def check_shapes(self, student: torch.Size, teacher: torch.Size, target: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("tgeo-kd", "student", student, "teacher", teacher)
        if len(student) != 2 or student[1] != self.num_classes or tuple(target) != (student[0],):
            raise ValueError(f"tgeo-kd: logits must be (batch, num_classes={self.num_classes}) and target (batch,), got "
                             f"{tuple(student)} and {tuple(target)}")

    def stage_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())  # the fusion network learns in the outer step only

    def class_mean_inputs(self) -> tuple[str, ...]:
        return () if bool(self.has_class_means) else ("teacher",)

    def class_mean_of(self, argument: str, value: Tensor) -> Tensor:
        return F.softmax(value.float(), dim=1)

    def set_class_means(self, means) -> None:  # type: ignore[override]
        self.class_mean_prediction.copy_(means["teacher"])
        self.has_class_means.fill_(True)

    # ------------------------------------------------------------------ the objective
    def features(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        """The relation features r (B, 4 C + 4), without gradient."""
        with torch.no_grad():
            p_s, p_t = F.softmax(to_float(student), dim=1), F.softmax(to_float(teacher), dim=1)
            g = F.one_hot(target, self.num_classes).to(p_s.dtype)
            t_bar = self.class_mean_prediction[target].to(p_s.dtype)
            vecs = [p_s - p_t, p_s - g, p_t - g, p_t - t_bar]
            return torch.cat(vecs + [torch.stack([v.norm(dim=1) for v in vecs], dim=1)], dim=1)

    def ratio(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        """alpha (B,): the fusion network's sample-wise weight of KD (differentiable in its parameters)."""
        r = self.features(student, teacher, target)
        return torch.sigmoid(self.fusion(r.to(self.fusion[0].weight.dtype))).squeeze(1)

    def fused(self, student: Tensor, teacher: Tensor, target: Tensor, alpha: Tensor) -> Tensor:
        """``1/B sum_i alpha_i KD_i + (1 - alpha_i) CE_i`` (float32)."""
        s, t = to_float(student), to_float(teacher)
        temp = self.temperature
        log_p_s = F.log_softmax(s / temp, dim=1)
        log_p_t = F.log_softmax(t / temp, dim=1)
        kd = temp * temp * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
        ce = F.cross_entropy(s, target, reduction="none")
        return (alpha * kd + (1 - alpha) * ce).mean()

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        alpha = self.ratio(student, teacher, target).detach()
        return self.fused(student, teacher.detach(), target, alpha)

    # ------------------------------------------------------------------ the outer (meta) step
    def outer_step(self, step: OuterStep) -> None:
        if step.step % self.meta_every:
            return
        params = list(self.fusion.parameters())
        grads = self.meta_gradients(step)
        step.reduce_mean(grads)
        adam_step(self, params, grads, self.meta_lr, self.betas, self.eps)

    def meta_gradients(self, step: OuterStep) -> list[Tensor]:
        """``grad_phi CE(f(x'; theta - eta grad_theta L(theta; phi)), y')`` for the fusion network's
        parameters phi (in ``self.fusion.parameters()`` order)."""
        s_name, t_name, y_name = self.names["student"], self.names["teacher"], self.names["target"]
        student = owner_of(s_name)
        theta = step.params(student)
        ns = step.forward(step.batch, [owner_of(t_name), student], {student: theta})
        y = ns[y_name]
        inner = self.fused(ns[s_name], ns[t_name].detach(), y, self.ratio(ns[s_name], ns[t_name], y))
        names = list(theta)
        grads = torch.autograd.grad(inner, [theta[k] for k in names], create_graph=True, allow_unused=True)
        lr = step.lr(student)
        ahead = {k: theta[k] - lr * g if g is not None else theta[k] for k, g in zip(names, grads)}
        held = step.forward(step.held_out, [student], {student: ahead})
        target_field = y_name if y_name in held else "batch.target"
        meta = F.cross_entropy(to_float(held[s_name]), held[target_field])
        params = list(self.fusion.parameters())
        self.last_meta_loss = meta.detach()
        return [g.detach() if g is not None else torch.zeros_like(p)
                for g, p in zip(torch.autograd.grad(meta, params, allow_unused=True), params)]


__all__ = ["TGeoKDLoss"]
