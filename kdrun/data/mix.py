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
    batches too, e.g. the clean image where training sees an augmented one.

    A transform whose ``per_step`` is true is called once per optimizer step instead, as
    ``window(micro_batches) -> micro_batches`` (a rollout that generates for the whole step at once)."""

    per_step = False

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def window(self, batches: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """The micro-batches of one optimizer step (used when ``per_step``): each transformed alone by default."""
        return [self(b) for b in batches]

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


class MixupOrCutMix(BatchTransform):
    """Mixup or CutMix, one of them per batch, with label smoothing: timm's ``Mixup`` in batch mode
    (the recipe of DeiT, MAE's fine-tuning and G2SD's specific stage: mixup alpha 0.8, cutmix alpha
    1.0, switch probability 0.5, label smoothing 0.1).

    CutMix is drawn with probability ``switch_prob`` (on the host, from torch's CPU generator: no
    device synchronisation); the mixed one-hot targets are then smoothed, ``q <- (1 - eps) q + eps / C``,
    which equals timm's mixing of smoothed one-hot targets. kdrun pairs each sample with a random
    permutation of the batch where timm pairs it with the reversed batch (the same distribution over a
    shuffled loader).

    Args: num_classes (set from data.num_classes), mixup_alpha (0.8), cutmix_alpha (1.0), switch_prob
    (0.5), label_smoothing (0.1).
    """

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 label_smoothing: float = 0.1) -> None:
        if not 0.0 <= switch_prob <= 1.0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"switch_prob must be in [0, 1] and label_smoothing in [0, 1), got {switch_prob}, "
                             f"{label_smoothing}")
        self.mixup, self.cutmix = Mixup(num_classes, mixup_alpha), CutMix(num_classes, cutmix_alpha)
        self.num_classes, self.switch_prob, self.label_smoothing = int(num_classes), float(switch_prob), float(label_smoothing)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        use_cutmix = bool(torch.rand(()) < self.switch_prob)
        out = (self.cutmix if use_cutmix else self.mixup)(batch)
        eps = self.label_smoothing
        out["soft_target"] = (1 - eps) * out["soft_target"] + eps / self.num_classes
        return out

    def __repr__(self) -> str:
        return (f"MixupOrCutMix(mixup_alpha={self.mixup.alpha}, cutmix_alpha={self.cutmix.alpha}, "
                f"switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing})")


class PatchMaskNoise(BatchTransform):
    """``batch.mask_noise``: one uniform draw (B, N) per sample and patch, N = (H / p) (W / p) for
    images (B, C, H, W) and patch size p, which every masked autoencoder reading it turns into the same
    mask (:class:`kdrun.models.mae.MaskedAutoencoder` keeps the patches with the lowest noise). G2SD
    masks its teacher and student identically this way.

    Evaluation batches get noise from a generator seeded with ``eval_seed`` at each call, so every
    evaluation masks the same patches (and draws nothing from the training generators).

    Args: patch_size (p, 16), eval_seed (0).
    """

    def __init__(self, patch_size: int = 16, eval_seed: int = 0) -> None:
        if int(patch_size) < 1:
            raise ValueError(f"patch_size must be at least 1, got {patch_size}")
        self.patch_size, self.eval_seed = int(patch_size), int(eval_seed)

    def _shape(self, x: Tensor) -> tuple[int, int]:
        h, w = x.shape[-2], x.shape[-1]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"mask noise: images {h}x{w} are not divisible into {self.patch_size}-pixel patches")
        return x.shape[0], (h // self.patch_size) * (w // self.patch_size)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["input"]
        return {**batch, "mask_noise": torch.rand(*self._shape(x), device=x.device)}

    def for_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["input"]
        gen = torch.Generator(device=x.device).manual_seed(self.eval_seed)
        return {**batch, "mask_noise": torch.rand(*self._shape(x), device=x.device, generator=gen)}

    def __repr__(self) -> str:
        return f"PatchMaskNoise(patch_size={self.patch_size})"
