"""Array data sets and the loader that serves them.

Every bundled data set is small enough to live in memory as one uint8 tensor of images
(N, C, H, W) and one int64 tensor of labels, so kdrun serves it without a DataLoader: a loader
draws one permutation per epoch from a generator seeded by (seed, stage, epoch), slices batches,
and applies augmentation to the whole batch at once (random crop with zero padding, horizontal
flip), then normalises. Order and augmentation are therefore a pure function of the seed and the
epoch, which makes resume exact and lets the same code run with the data on the GPU.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from kdrun.data.subsets import class_coverage, stratified_indices
from kdrun.errors import KdrunError


@dataclass(frozen=True)
class LongTailInfo:
    """What a long-tailed training set kept (kdrun.data.longtail): the kept samples' indices into the
    full training set (ascending), the kept images per class, and the imbalance factor."""

    kept_indices: Tensor
    class_counts: Tensor
    imbalance_factor: float | None = None


@dataclass
class ArraySplits:
    """Training and test arrays: images uint8 (N, C, H, W), labels int64 (N,); ``long_tail`` for a
    long-tailed training set."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    long_tail: LongTailInfo | None = None
    meta: ArraySplits | None = None  # a held-out meta set in its training part (data.meta_split)

    def __post_init__(self) -> None:
        for name in ("train", "test"):
            x, y = getattr(self, f"{name}_images"), getattr(self, f"{name}_labels")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"{name} images must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"{name} labels {tuple(y.shape)} do not match {x.shape[0]} images")
        self.train_labels = self.train_labels.long()
        self.test_labels = self.test_labels.long()

    @property
    def num_train(self) -> int:
        return int(self.train_labels.shape[0])

    @property
    def kept_indices(self) -> Tensor | None:
        return self.long_tail.kept_indices if self.long_tail is not None else None

    @property
    def train_class_counts(self) -> Tensor | None:
        return self.long_tail.class_counts if self.long_tail is not None else None

    @property
    def imbalance_factor(self) -> float | None:
        return self.long_tail.imbalance_factor if self.long_tail is not None else None

    def sample_batch(self, k: int = 2) -> dict[str, Tensor]:
        """A batch of ``k`` training images scaled to [0, 1], for the builder's shape trace."""
        return {"input": self.train_images[:k].float() / 255.0, "target": self.train_labels[:k],
                "index": torch.arange(min(k, self.num_train))}

    def validation_split(self, n: int, seed: int = 0) -> ArraySplits:
        """Hold out ``n`` training examples (a seeded random choice) as the evaluation set; the test set
        is not used. The remaining training examples keep their order."""
        total = self.num_train
        if not 0 < n < total:
            raise ValueError(f"data.val_split must be between 1 and {total - 1}, got {n}")
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        val, train = perm[:n].sort().values, perm[n:].sort().values
        return ArraySplits(self.train_images[train], self.train_labels[train], self.train_images[val], self.train_labels[val])

    def meta_split(self, n: int, seed: int = 0) -> ArraySplits:
        """The splits without ``n`` training examples, which become ``meta``'s training part: a
        class-stratified seeded choice (:func:`kdrun.data.subsets.stratified_indices`), each part in file
        order. The meta set of a bilevel component; the test set is untouched."""
        total = self.num_train
        if not 0 < n < total:
            raise ValueError(f"data.meta_split must be between 1 and {total - 1}, got {n}")
        if self.long_tail is not None:
            raise ValueError("data.meta_split is not supported with long-tailed data sets (it would change the class counts)")
        meta = stratified_indices(self.train_labels, n, total, seed)
        keep = torch.ones(total, dtype=torch.bool)
        keep[meta] = False
        rest = keep.nonzero().flatten()
        held = ArraySplits(self.train_images[meta], self.train_labels[meta], self.test_images[:1], self.test_labels[:1])
        return ArraySplits(self.train_images[rest], self.train_labels[rest], self.test_images, self.test_labels, meta=held)

    def subset(self, n: int, seed: int = 0) -> ArraySplits:
        """``n`` training examples and a proportional number of test examples, each a class-stratified
        seeded choice (:func:`kdrun.data.subsets.stratified_indices`), kept in file order."""
        n_train = len(self.train_labels)
        n = min(int(n), n_train)
        n_test = max(1, math.ceil(len(self.test_labels) * n / n_train))
        train = stratified_indices(self.train_labels, n, n_train, seed)
        test = stratified_indices(self.test_labels, n_test, len(self.test_labels), seed + 1)
        lt = self.long_tail
        if lt is not None:  # long-tailed sets: keep their metadata true
            counts = torch.bincount(self.train_labels[train], minlength=len(lt.class_counts))
            lt = LongTailInfo(lt.kept_indices[train], counts, lt.imbalance_factor)
        return ArraySplits(self.train_images[train], self.train_labels[train], self.test_images[test],
                           self.test_labels[test], lt)

    @property
    def class_coverage(self) -> dict[str, int | None]:
        """Distinct classes in the training and the test split."""
        return {"train": class_coverage(self.train_labels), "test": class_coverage(self.test_labels)}


def shard_sizes(n: int, world_size: int) -> list[int]:
    """How ``torch.tensor_split`` shares ``n`` samples among ``world_size`` ranks."""
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def draw_crop_flip(n: int, padding: int, hflip: bool, generator: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Random crop offsets (dy, dx in [0, 2*padding]) and flip flags for ``n`` images."""
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    flip = torch.rand(n, generator=generator, device=device) < 0.5 if hflip else torch.zeros(n, dtype=torch.bool, device=device)
    return dy, dx, flip


def apply_crop_flip(x: Tensor, padding: int, dy: Tensor, dx: Tensor, flip: Tensor) -> Tensor:
    """Crop each image of the zero-padded batch at its (dy, dx) and flip where ``flip``.

    Vectorised over the batch: one gather with per-sample offsets, no loop over samples.
    """
    b, c, h, w = x.shape
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]  # B,1,H,1
        cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]  # B,1,1,W
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[bidx, cidx, rows, cols]
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def random_crop_flip(x: Tensor, padding: int, hflip: bool, generator: torch.Generator) -> Tensor:
    """Random crop of the original size from the zero-padded batch, then a random horizontal flip."""
    dy, dx, flip = draw_crop_flip(x.shape[0], padding, hflip, generator, x.device)
    return apply_crop_flip(x, padding, dy, dx, flip)


class ArrayLoader:
    """Batches of ``{"input", "target", "index"}`` from in-memory arrays.

    Args:
        images, labels: uint8 (N, C, H, W) and int64 (N,); moved to ``device`` once.
        batch_size: samples per batch. drop_last: drop the last incomplete batch.
        train: shuffle and augment (crop ``crop_padding``, ``hflip``); else serve in order.
        mean, std: per-channel normalisation applied to images scaled to [0, 1].
        seed: base of the per-epoch generator.
        max_batches: serve at most this many batches per epoch (smoke tests).
        rank, world_size: data parallelism: ``batch_size`` is the global batch; this process serves
            its contiguous share of every global batch, augmented exactly as it would be alone.
    """

    def __init__(self, images: Tensor, labels: Tensor, *, batch_size: int, train: bool,
                 mean: list[float], std: list[float], device: torch.device, seed: int = 0,
                 crop_padding: int = 0, hflip: bool = False, drop_last: bool = False,
                 max_batches: int | None = None, rank: int = 0, world_size: int = 1) -> None:
        if mean is None or std is None:
            raise KdrunError("data.mean and data.std are needed to normalise image arrays: set them in the data config")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device)
        self.batch_size = int(batch_size)
        self.train = train
        self.crop_padding = int(crop_padding) if train else 0
        self.hflip = bool(hflip) and train
        self.drop_last = drop_last and train
        self.seed = int(seed)
        self.max_batches = max_batches
        self.rank, self.world_size = int(rank), int(world_size)
        c = images.shape[1]
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float32))).view(1, c, 1, 1).to(self.device)
        self.shift = (torch.tensor(mean, dtype=torch.float32) / torch.tensor(std, dtype=torch.float32)).view(1, c, 1, 1).to(self.device)
        self.epoch_key, self.start = 0, 0
        self.channels_last = False

    def __len__(self) -> int:
        n = len(self.labels)
        batches = n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def set_epoch(self, key: int, start: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iteration serves, from its batch
        ``start`` on (a resumed epoch: the earlier batches' random draws are made and discarded, so
        the rest is exactly what the uninterrupted epoch serves)."""
        self.epoch_key, self.start = int(key), int(start)

    def rank_sizes(self, i: int) -> list[int]:
        """The number of samples of batch ``i`` on every rank (the global batch split as served)."""
        return shard_sizes(min(self.batch_size, len(self.labels) - i * self.batch_size), self.world_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        n = len(self.labels)
        gen = torch.Generator(device=self.device)
        gen.manual_seed(self.seed * 1_000_003 + self.epoch_key)
        order = torch.randperm(n, generator=gen, device=self.device) if self.train else torch.arange(n, device=self.device)
        augment = self.crop_padding > 0 or self.hflip
        start, self.start = self.start, 0
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if augment:  # drawn for the global batch, so every rank sees what one process would
                dy, dx, flip = draw_crop_flip(len(idx), self.crop_padding, self.hflip, gen, self.device)
            if i < start:
                continue
            if self.world_size > 1:
                part = torch.tensor_split(torch.arange(len(idx), device=self.device), self.world_size)[self.rank]
                idx = idx[part]
                if augment:
                    dy, dx, flip = dy[part], dx[part], flip[part]
            x = self.images[idx]
            if augment:
                x = apply_crop_flip(x, self.crop_padding, dy, dx, flip)
            x = x.float().mul_(self.scale).sub_(self.shift)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield {"input": x, "target": self.labels[idx], "index": idx}
