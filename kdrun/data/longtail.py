"""Long-tailed CIFAR (CIFAR-10-LT / CIFAR-100-LT), the construction of Cao et al., "Learning Imbalanced
Datasets with Label-Distribution-Aware Margin Loss", NeurIPS 2019 (LDAM-DRW, ``imbalance_cifar.py``).

With ``n_max`` = training images per class of the balanced set (500 for CIFAR-100, 5,000 for CIFAR-10),
C classes and imbalance factor IF (the ratio of the largest to the smallest class), class c keeps
``int(n_max * (1 / IF) ** (c / (C - 1)))`` training images (the exponential profile, computed in
Python floats exactly as the reference does, so the counts match it): for CIFAR-100 with IF = 100,
500 for class 0 down to 5 for class 99, 10,847 in total (12,608 for IF = 50, 19,573 for IF = 10). The
test set stays balanced.

Which images a class keeps: by default its *first* ones in the data set's order (deterministic, no
random state). The reference instead shuffles each class's indices with NumPy's global generator seeded
with 0 (``np.random.seed(0)``, then one ``np.random.shuffle`` per class in class order);
``shuffle_seed=0`` reproduces that selection exactly. The counts, and hence every published table's
class profile, are the same either way; the images differ. The kept images stay in the data set's
order (the reference concatenates them class by class; the training loader shuffles anyway).

Evaluation by shot group (Liu et al., "Large-Scale Long-Tailed Recognition in an Open World", CVPR
2019): many-shot classes have more than 100 training images, medium-shot 20 to 100, few-shot fewer
than 20 (35 / 35 / 30 classes for CIFAR-100-LT with IF = 100).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from kdrun.data.arrays import ArraySplits, LongTailInfo
from kdrun.data.sources import load_cifar

_CLASSES = {"cifar10": 10, "cifar100": 100}


def long_tail_counts(num_per_class: int, imbalance_factor: float, num_classes: int) -> list[int]:
    """Images kept per class: ``int(num_per_class * (1 / IF) ** (c / (C - 1)))`` for c = 0 .. C-1."""
    if imbalance_factor < 1:
        raise ValueError(f"long tail: imbalance_factor must be >= 1, got {imbalance_factor}")
    if num_classes < 1:
        raise ValueError(f"long tail: num_classes must be positive, got {num_classes}")
    ratio = 1.0 / float(imbalance_factor)
    denom = max(num_classes - 1.0, 1.0)
    return [int(num_per_class * (ratio ** (c / denom))) for c in range(num_classes)]


def long_tail_indices(labels: Tensor, imbalance_factor: float, num_classes: int,
                      shuffle_seed: int | None = None) -> Tensor:
    """Indices (ascending, int64) of the training samples a long-tailed subset of ``labels`` keeps.

    ``n_max = len(labels) // num_classes`` (the reference's ``img_max``); class c keeps
    ``min(long_tail_counts(...)[c], available)`` images: its first ones in ``labels`` order, or, with
    ``shuffle_seed``, the reference's seeded per-class shuffle (see the module docstring).
    """
    labels = torch.as_tensor(labels).long().flatten().cpu()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"long tail: labels must be in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]")
    keep = torch.tensor(long_tail_counts(labels.numel() // num_classes, imbalance_factor, num_classes), dtype=torch.long)
    if shuffle_seed is None:
        order = torch.argsort(labels, stable=True)  # class by class, data set order within a class
        sorted_labels = labels[order]
        starts = torch.searchsorted(sorted_labels, torch.arange(num_classes))
        rank = torch.arange(labels.numel()) - starts[sorted_labels]  # position within its class
        kept = order[rank < keep[sorted_labels]]
    else:
        rng = np.random.RandomState(int(shuffle_seed))
        y = labels.numpy()
        parts = []
        for c in np.unique(y):  # the reference's loop: one shuffle per class present, in class order
            idx = np.where(y == c)[0]
            rng.shuffle(idx)
            parts.append(idx[: int(keep[c])])
        kept = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)).long()
    return torch.sort(kept).values


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """Samples per class, (num_classes,) int64."""
    return torch.bincount(torch.as_tensor(labels).long().flatten(), minlength=num_classes)


def shot_groups(train_class_counts: Tensor) -> dict[str, Tensor]:
    """Boolean class masks by training images per class: ``many`` (> 100), ``medium`` (20 .. 100), ``few`` (< 20)."""
    n = torch.as_tensor(train_class_counts)
    return {"many": n > 100, "medium": (n >= 20) & (n <= 100), "few": n < 20}


def load_cifar_lt(root: str | None, imbalance_factor: float = 100, variant: str = "cifar100",
                  shuffle_seed: int | None = None, download: bool = False) -> ArraySplits:
    """CIFAR-10/100-LT: :func:`kdrun.data.sources.load_cifar` with the training set cut to a long tail.

    Returns :class:`ArraySplits` (test set unchanged) whose ``long_tail`` holds ``kept_indices``
    (int64, the kept samples' indices into the full training set, ascending), ``class_counts``
    (int64 (num_classes,), also ``splits.train_class_counts``) and ``imbalance_factor``.

    Args:
        root, variant, download: as for :func:`load_cifar`.
        imbalance_factor: IF (10, 50 and 100 are the published settings).
        shuffle_seed: None (default): each class keeps its first images; an int: the reference's seeded
            selection (0 reproduces LDAM-DRW's split).
    """
    full = load_cifar(root, variant=variant, download=download)
    num_classes = _CLASSES[variant]
    kept = long_tail_indices(full.train_labels, imbalance_factor, num_classes, shuffle_seed)
    labels = full.train_labels[kept]
    info = LongTailInfo(kept, class_counts(labels, num_classes), float(imbalance_factor))
    return ArraySplits(full.train_images[kept], labels, full.test_images, full.test_labels, info)


__all__ = ["class_counts", "load_cifar_lt", "long_tail_counts", "long_tail_indices", "shot_groups"]
