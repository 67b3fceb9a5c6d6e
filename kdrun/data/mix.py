"""Batch transforms applied to a training batch before any model sees it (teacher and student alike).

A transform maps the batch dict (``input``, ``target``, ``index``) to a new one with the mixed
``input`` and ``soft_target`` (B, C), the mixed one-hot targets that a cross-entropy term reads as
``batch.soft_target``. ``target`` keeps each sample's own label (of the first image of its pair).
Everything is drawn on the batch's device from torch's global generator (seeded, and saved in
checkpoints): no host-device synchronisation.

``fraction`` is the share of the batch that is mixed; the other samples keep mixing weight 1 (their
own image and one-hot target). ``fraction < 1`` is the partial mixup (PMU) of Choi et al.,
"Understanding the Role of Mixup in Knowledge Distillation: An Empirical Study", WACV 2023, whose
code mixes about 10% of each batch (``fraction = 0.1``) with one weight per sample, Beta(1, 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class BatchTransform:
    """Base of batch transforms: ``__call__(batch) -> batch`` on every training micro-batch, before any
    model; ``for_eval(batch) -> batch`` on evaluation batches (default: unchanged). A transform that
    adds a field some model reads (``inputs: {x: batch.<field>}``) must give that field on evaluation
    batches too, e.g. the clean image where training sees an augmented one."""

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def for_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return batch


def _beta(alpha: float, shape: tuple[int, ...], device: torch.device) -> Tensor:
    """``Beta(alpha, alpha)`` draws on ``device``. ``validate_args=False``: the distribution's argument
    check reads the concentration tensor on the host (a device sync per step); alpha > 0 is checked once,
    in the transform's constructor."""
    a = torch.full(shape, float(alpha), device=device)
    return torch.distributions.Beta(a, a, validate_args=False).sample()


def _mixed_rows(n: int, fraction: float, device: torch.device) -> Tensor:
    """A (n,) boolean mask with exactly round(fraction * n) randomly chosen True entries."""
    k = int(round(fraction * n))
    mask = torch.zeros(n, dtype=torch.bool, device=device)
    if k > 0:
        mask[torch.randperm(n, device=device)[:k]] = True
    return mask


class _Mix(BatchTransform):
    def __init__(self, num_classes: int, alpha: float = 1.0, fraction: float = 1.0) -> None:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive (the Beta(alpha, alpha) parameter), got {alpha}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction (the share of the batch that is mixed) must be in [0, 1], got {fraction}")
        self.num_classes, self.alpha, self.fraction = int(num_classes), float(alpha), float(fraction)

    def _soft(self, y: Tensor, perm: Tensor, lam: Tensor) -> Tensor:
        onehot = F.one_hot(y, self.num_classes).float()
        return lam[:, None] * onehot + (1 - lam[:, None]) * onehot[perm]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, fraction={self.fraction})"


class OneHotTargets(BatchTransform):
    """``batch.soft_target`` = the one-hot label: what a stage reading ``batch.soft_target`` gets
    when no mixing transform is configured (the builder adds it then)."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = int(num_classes)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        return {**batch, "soft_target": F.one_hot(batch["target"], self.num_classes).float()}

    def __repr__(self) -> str:
        return f"OneHotTargets(num_classes={self.num_classes})"


class Mixup(_Mix):
    """Mixup, Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018.

    ``x_i <- lam_i x_i + (1 - lam_i) x_perm(i)``, ``q_i = lam_i onehot(y_i) + (1 - lam_i) onehot(y_perm(i))``
    with ``lam ~ Beta(alpha, alpha)``: one value for the whole batch (``per_sample: false``, the
    original) or one per sample (as in the partial-mixup code); unmixed samples have ``lam_i = 1``.

    Args: num_classes (set by kdrun from data.num_classes), alpha (default 1.0), fraction (default
    1.0: every sample mixed), per_sample (default False).
    """

    def __init__(self, num_classes: int, alpha: float = 1.0, fraction: float = 1.0, per_sample: bool = False) -> None:
        super().__init__(num_classes, alpha, fraction)
        self.per_sample = bool(per_sample)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["input"], batch["target"]
        n, dev = y.shape[0], y.device
        lam = _beta(self.alpha, (n,) if self.per_sample else (1,), dev).expand(n)
        if self.fraction < 1.0:
            lam = torch.where(_mixed_rows(n, self.fraction, dev), lam, torch.ones_like(lam))
        perm = torch.randperm(n, device=dev)
        shape = (n,) + (1,) * (x.dim() - 1)
        lx = lam.to(x.dtype).view(shape)
        out = dict(batch)
        out["input"] = lx * x + (1 - lx) * x[perm]
        out["soft_target"] = self._soft(y, perm, lam)
        return out


class CutMix(_Mix):
    """CutMix, Yun et al., "CutMix: Regularization Strategy to Train Strong Classifiers with
    Localizable Features", ICCV 2019.

    A box of area ``(1 - lam) H W`` (``lam ~ Beta(alpha, alpha)``, centre uniform, clipped at the
    border) is pasted from ``x_perm(i)`` into ``x_i``; the targets are mixed by the area actually
    kept, ``lam' = 1 - box area / (H W)``. One box per batch; samples outside ``fraction`` keep
    their image and target.
    """

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x, y = batch["input"], batch["target"]
        n, dev = y.shape[0], y.device
        h, w = x.shape[-2], x.shape[-1]
        lam = _beta(self.alpha, (1,), dev)
        cut = torch.sqrt(1 - lam)
        ch, cw = (cut * h).floor(), (cut * w).floor()
        cy = torch.randint(0, h, (1,), device=dev).float()
        cx = torch.randint(0, w, (1,), device=dev).float()
        y0, y1 = (cy - ch / 2).floor().clamp(0, h), (cy + ch / 2).floor().clamp(0, h)
        x0, x1 = (cx - cw / 2).floor().clamp(0, w), (cx + cw / 2).floor().clamp(0, w)
        rows = torch.arange(h, device=dev).float()
        cols = torch.arange(w, device=dev).float()
        box = ((rows >= y0) & (rows < y1))[:, None] & ((cols >= x0) & (cols < x1))[None, :]  # (H, W)
        kept = 1 - box.float().mean()
        mixed = _mixed_rows(n, self.fraction, dev) if self.fraction < 1.0 else torch.ones(n, dtype=torch.bool, device=dev)
        perm = torch.randperm(n, device=dev)
        paste = (mixed[:, None, None] & box[None]).unsqueeze(1)  # (B, 1, H, W)
        out = dict(batch)
        out["input"] = torch.where(paste, x[perm], x)
        lam_i = torch.where(mixed, kept.expand(n), torch.ones(n, device=dev))
        out["soft_target"] = self._soft(y, perm, lam_i)
        return out
