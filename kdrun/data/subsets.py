"""Unbiased subsets of a data set (``data.subset=N``): class-stratified and seeded, whatever the file order.

Many data sets store their samples sorted by class (the CIFAR-100 test split of the offline copy, every
ImageFolder tree), so "the first N" covers a few classes only and a smoke run's accuracy means nothing.
:func:`stratified_indices` draws a seeded random order, then takes samples class by class in proportion
to each class's share of the split: with ``n`` samples from a split of ``N`` samples, class ``c`` (of
``N_c``) gets ``round(n * N_c / N)`` of them, give or take one, so every class is present once
``n >= number of classes`` (largest-remainder allocation, computed without a loop over samples). Data
without class labels (token corpora) get a seeded uniform choice.
"""
from __future__ import annotations

import torch
from torch import Tensor


def stratified_indices(labels: Tensor | None, n: int, total: int, seed: int) -> Tensor:
    """Sorted indices of ``n`` of ``total`` samples: a class-stratified seeded choice when ``labels``
    (int64, ``(total,)``) are given, a seeded uniform choice otherwise."""
    n = min(int(n), total)
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(total, generator=g)
    if labels is None or labels.dim() != 1 or labels.is_floating_point():
        return perm[:n].sort().values
    y = labels.long()[perm]
    classes, y = torch.unique(y, return_inverse=True)
    counts = torch.bincount(y, minlength=len(classes))
    # rank of each sample within its class, in the permuted order
    order = torch.argsort(y, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(y)
    rank[order] = torch.arange(total) - starts[y[order]]
    # largest remainder: sample r of class c is taken at "time" (r + 0.5) / N_c; the n earliest are kept
    key = (rank.double() + 0.5) / counts[y].double()
    keep = torch.argsort(key, stable=True)[:n]
    return perm[keep].sort().values


def class_coverage(labels: Tensor | None) -> int | None:
    """How many distinct classes ``labels`` hold (None when the data has no class labels)."""
    if labels is None or labels.dim() != 1 or labels.is_floating_point():
        return None
    return int(torch.unique(labels).numel())
