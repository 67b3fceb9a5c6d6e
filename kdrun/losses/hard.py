"""HARD: knowledge distillation on augmentations learned to make teacher and student disagree.

Nix, Burg, Sinz, "HARD: Hard Augmentations for Robust Distillation", arXiv 2305.14890 (2023). From the
paper's abstract: an augmentation model generates inputs on which the teacher and the student disagree,
and the student is distilled on them; augmentors range from spatial transformations to edits in a
pretrained VAE's latent space. The min-max, as kdrun runs it:

    augmentor:  max_phi  KL(p_t(x~) || p_s(x~)) - lam CE(t(x~), y),   x~ = g_phi(x)
    student:    min_theta  KD(s, t) on the batch with a share ``p`` of its images replaced by x~

alternating, each with its own optimiser: before every optimizer step the augmentor takes one Adam step
on the step's first micro-batch (the engine's outer step; gradients flow through the frozen teacher and
the student into x~, never into their weights, and their BatchNorm statistics are left alone), then the
models train on micro-batches augmented by the updated augmentor (the term's ``transform_batch``). Both
models see the augmented images; evaluation batches are never augmented. KD_T's value is this term's:
``T^2 KL(softmax(t/T) || softmax(s/T))`` averaged over the batch.

The augmentor (:class:`AffineAugmentor`, the abstract's "simple spatial transformations"): a small CNN
reads each image and predicts an affine transform ``A = [I | 0] + bound * tanh(W h)`` (initialised at the
identity), applied by bilinear resampling with zero padding.

What the abstract does not fix, kdrun's choices (the paper's method section and code were not read):
the augmentor's network and its bound (0.5 on every affine entry), the label-keeping penalty ``lam CE(t(x~),
y)`` with lam 1 (without it the augmentor could erase the image), the augmented share p 0.5 (a random half
of each batch), the augmentor's Adam lr 1e-3 and the disagreement's temperature (KD's T, 4). The VAE
augmentor is not built.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.component import BuildContext, OuterStep
from kdrun.losses.adam import adam_step, add_adam_state
from kdrun.losses.base import LossTerm, model_input_names, require_same_shape
from kdrun.losses.features import to_float
from kdrun.losses.logits import KDLoss
from kdrun.names import owner_of


class AffineAugmentor(nn.Module):
    """x -> x~: a per-image affine warp predicted from the image (a spatial transformer, Jaderberg et al.,
    NeurIPS 2015): conv3x3(C, width) - ReLU - stride-2 conv3x3(width, width) - ReLU - global average - linear
    to 6 numbers ``d``; ``A = [[1, 0, 0], [0, 1, 0]] + bound tanh(d)``; x~ = bilinear ``grid_sample`` of x
    at ``affine_grid(A)`` (zeros outside). The last layer starts at zero: x~ = x at initialisation."""

    def __init__(self, in_channels: int = 3, width: int = 16, bound: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.theta = nn.Linear(width, 6)
        nn.init.zeros_(self.theta.weight)
        nn.init.zeros_(self.theta.bias)
        self.bound = float(bound)
        self.register_buffer("identity", torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))

    def transforms(self, x: Tensor) -> Tensor:
        """A (B, 2, 3)."""
        return self.identity + self.bound * torch.tanh(self.theta(self.features(x))).view(-1, 2, 3)

    def forward(self, x: Tensor) -> Tensor:
        a = self.transforms(x)
        grid = F.affine_grid(a.to(x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class HARDLoss(LossTerm):
    """KD on a batch partly augmented by a learned adversarial augmentor (see the module docstring).

    Args:
        in_channels: image channels (for the augmentor). temperature: T (4). label_weight: lam (1).
        fraction: p, the share of each batch augmented (0.5). augmentor_lr: its Adam lr (1e-3). width,
        bound: the augmentor's (16, 0.5).
    Inputs: ``student`` (B, C) logits, ``teacher`` (B, C) logits, ``target`` (B,) labels (the penalty).
    """

    wants_outer_step = True
    transforms_batch = True
    outer_step_needs_held_out = False

    def __init__(self, in_channels: int = 3, temperature: float = 4.0, label_weight: float = 1.0, fraction: float = 0.5,
                 augmentor_lr: float = 1e-3, width: int = 16, bound: float = 0.5,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__()
        if temperature <= 0 or augmentor_lr <= 0 or label_weight < 0 or not 0.0 <= fraction <= 1.0:
            raise ValueError(f"HARD: temperature and augmentor_lr must be positive, label_weight >= 0 and fraction in "
                             f"[0, 1]; got {temperature}, {augmentor_lr}, {label_weight}, {fraction}")
        self.temperature, self.label_weight, self.fraction = float(temperature), float(label_weight), float(fraction)
        self.lr, self.betas, self.eps = float(augmentor_lr), tuple(betas), float(eps)
        self.augmentor = AffineAugmentor(in_channels, width, bound)
        self._kd = KDLoss(self.temperature)
        add_adam_state(self, list(self.augmentor.parameters()))
        self.names: dict[str, str] = {}
        self.last_disagreement: Tensor | None = None

    def setup(self, ctx: BuildContext) -> None:
        self.names = model_input_names(ctx, "HARD")

    def check_shapes(self, student: torch.Size, teacher: torch.Size, target: torch.Size) -> None:  # type: ignore[override]
        require_same_shape("HARD", "student", student, "teacher", teacher)
        if len(student) != 2 or tuple(target) != (student[0],):
            raise ValueError(f"HARD: logits must be (batch, classes) and target (batch,), got {tuple(student)} and {tuple(target)}")

    def stage_parameters(self) -> Iterator[nn.Parameter]:
        return iter(())  # the augmentor learns in the outer step only, by ascent

    def kd(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``T^2 / B sum_i KL(softmax(t_i / T) || softmax(s_i / T))`` (:class:`kdrun.losses.KDLoss`)."""
        return self._kd(student, teacher)

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        return self.kd(student, teacher.detach())

    # ------------------------------------------------------------------ the augmentation
    def _mixed(self, batch: Mapping[str, Tensor], augmented: Tensor) -> dict[str, Tensor]:
        x = batch["input"]
        chosen = torch.rand(x.shape[0], device=x.device) < self.fraction
        keep = chosen.view(-1, *([1] * (x.dim() - 1)))
        return {**batch, "input": torch.where(keep, augmented.to(x.dtype), x)}

    def transform_batch(self, batch: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        if not self.training or self.fraction == 0.0:
            return batch
        with torch.no_grad():
            return self._mixed(batch, self.augmentor(batch["input"]))

    def disagreement(self, step: OuterStep) -> Tensor:
        """The augmentor's objective to minimise: ``-KL(p_t(x~) || p_s(x~)) + lam CE(t(x~), y)`` on the whole
        first micro-batch, with the models' weights held (gradients reach x~ only)."""
        s_name, t_name, y_name = self.names["student"], self.names["teacher"], self.names["target"]
        models = [owner_of(t_name), owner_of(s_name)]
        held = {m: {k: p.detach() for k, p in step.params(m).items()} for m in models}
        augmented = {**step.batch, "input": self.augmentor(step.batch["input"])}
        ns = step.forward(augmented, models, held)
        s, t, y = ns[s_name], ns[t_name], ns[y_name]
        gap = self.kd(s, t)
        self.last_disagreement = gap.detach()
        return -gap + self.label_weight * F.cross_entropy(to_float(t), y)

    def outer_step(self, step: OuterStep) -> None:
        params = list(self.augmentor.parameters())
        grads = torch.autograd.grad(self.disagreement(step), params, allow_unused=True)
        grads = [g.detach() if g is not None else torch.zeros_like(p) for g, p in zip(grads, params)]
        step.reduce_mean(grads)
        adam_step(self, params, grads, self.lr, self.betas, self.eps)


__all__ = ["AffineAugmentor", "HARDLoss"]
