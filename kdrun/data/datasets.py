"""Data sets that do not fit in memory as arrays (ImageNet-style image folders): ordinary torch
``Dataset`` objects with per-sample transforms, served by a ``DataLoader`` with worker processes.

:class:`DatasetLoader` has the interface of :class:`~kdrun.data.arrays.ArrayLoader` (``set_epoch``,
``len``, batches of ``{"input", "target", "index"}`` on the device), so the engine does not care
which one it gets. The shuffling order is a function of (seed, epoch), as for arrays.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from kdrun.data.subsets import class_coverage, stratified_indices
from kdrun.errors import KdrunError


class _Indexed(Dataset):
    """Items ``(image, label, index)`` of a dataset of ``(image, label)``."""

    def __init__(self, ds: Dataset) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x, y = self.ds[i]
        return x, y, i


@dataclass
class DatasetSplits:
    """A training and a test ``Dataset`` of ``(image tensor, label)`` items, already transformed."""

    train: Dataset
    test: Dataset

    @property
    def num_train(self) -> int:
        return len(self.train)  # type: ignore[arg-type]

    def subset(self, n: int, seed: int = 0) -> DatasetSplits:
        """``n`` training items and a proportional number of test items, each a seeded choice,
        class-stratified when the data set lists its labels (``targets``), kept in order."""
        n_train, n_test = self.num_train, len(self.test)  # type: ignore[arg-type]
        n = min(int(n), n_train)
        m = max(1, math.ceil(n_test * n / n_train))
        train = stratified_indices(self.train_labels, n, n_train, seed).tolist()
        test = stratified_indices(_labels(self.test), m, n_test, seed + 1).tolist()
        return DatasetSplits(Subset(self.train, train), Subset(self.test, test))

    @property
    def class_coverage(self) -> dict[str, int | None]:
        """Distinct classes in each split, when the data sets list their labels (else None)."""
        return {"train": class_coverage(self.train_labels), "test": class_coverage(_labels(self.test))}

    def validation_split(self, n: int, seed: int = 0) -> DatasetSplits:
        """Hold out ``n`` training items (seeded) as the evaluation set instead of the test set.

        The held-out items keep the training transforms (augmentation included) of the training set."""
        total = self.num_train
        if not 0 < n < total:
            raise ValueError(f"data.val_split must be between 1 and {total - 1}, got {n}")
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        return DatasetSplits(Subset(self.train, perm[n:].sort().values.tolist()), Subset(self.train, perm[:n].sort().values.tolist()))

    @property
    def train_labels(self) -> Tensor | None:
        """The training labels when the dataset lists them (``targets``, as torchvision's do), else None."""
        return _labels(self.train)

    def sample_batch(self, k: int = 2) -> dict[str, Tensor]:
        """``k`` test items as a batch, for the builder's shape trace."""
        items = [self.test[i] for i in range(min(k, len(self.test)))]  # type: ignore[arg-type]
        return {"input": torch.stack([x for x, _ in items]), "target": torch.tensor([int(y) for _, y in items]),
                "index": torch.arange(len(items))}


def _labels(ds: Dataset) -> Tensor | None:
    """The labels of ``ds`` (through any ``Subset`` chain) when its base data set lists them as ``targets``."""
    idx = None
    while isinstance(ds, Subset):
        idx = [ds.indices[i] for i in idx] if idx is not None else list(ds.indices)
        ds = ds.dataset
    targets = getattr(ds, "targets", None)
    if targets is None:
        return None
    labels = torch.as_tensor(targets, dtype=torch.long)
    return labels[torch.as_tensor(idx, dtype=torch.long)] if idx is not None else labels


class DatasetLoader:
    """Batches of ``{"input", "target", "index"}`` from a ``Dataset`` through a ``DataLoader``."""

    def __init__(self, dataset: Dataset, *, batch_size: int, train: bool, device: torch.device, seed: int = 0,
                 num_workers: int = 4, drop_last: bool = False, max_batches: int | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        from torch.utils.data.distributed import DistributedSampler

        self.dataset = _Indexed(dataset)
        self.device = torch.device(device)
        self.train = train
        self.seed = int(seed)
        self.max_batches = max_batches
        self.generator = torch.Generator()
        if world_size > 1 and not train:  # evaluation: contiguous shards, no padding (a duplicate would count twice)
            self.sampler = _Shard(len(self.dataset), rank, world_size)
        else:
            self.sampler = (DistributedSampler(self.dataset, world_size, rank, shuffle=train, seed=self.seed,
                                               drop_last=drop_last and train)
                            if world_size > 1 else _EpochOrder(self) if train else None)
        self.loader = DataLoader(self.dataset, batch_size=batch_size // world_size, sampler=self.sampler,
                                 shuffle=False, drop_last=drop_last and train,
                                 num_workers=num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0, generator=self.generator)
        self.epoch_key, self.start = 0, 0
        self.per_rank_batch = batch_size // world_size
        self.world_size = world_size
        self.rank_samples = len(self.sampler) if self.sampler is not None else len(self.dataset)
        self.channels_last = False  # NHWC image batches (trainer.channels_last), as the array loader makes them

    def __len__(self) -> int:
        n = len(self.loader)
        return min(n, self.max_batches) if self.max_batches else n

    def set_epoch(self, key: int, start: int = 0) -> None:
        """Select the epoch (order a function of (seed, key)), from its batch ``start`` on: the earlier
        batches are drawn by the sampler and skipped unread. The order is exact on resume; random
        per-sample transforms in worker processes are not (their generators restart)."""
        self.epoch_key, self.start = int(key), int(start)
        if self.world_size > 1 and self.train:  # DistributedSampler; a single process's _EpochOrder reads the key itself
            self.sampler.set_epoch(self.epoch_key)

    def _order(self) -> list[int]:
        """This epoch's sample order on this rank, as the training DataLoader draws it."""
        return list(iter(self.sampler)) if self.sampler is not None else list(range(len(self.dataset)))

    def rank_sizes(self, i: int) -> list[int]:
        """Samples of batch ``i`` on every rank (DistributedSampler gives every rank the same count)."""
        return [min(self.per_rank_batch, self.rank_samples - i * self.per_rank_batch)] * self.world_size

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch_key)
        start, self.start = self.start, 0
        loader = self.loader
        if start:
            loader = DataLoader(self.dataset, batch_size=self.loader.batch_size, drop_last=self.loader.drop_last,
                                num_workers=self.loader.num_workers, pin_memory=self.loader.pin_memory,
                                sampler=_Skip(self._order(), start * self.loader.batch_size))
        for i, (x, y, idx) in enumerate(loader, start=start):
            if self.max_batches and i >= self.max_batches:
                break
            x = x.to(self.device, non_blocking=True)
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            yield {"input": x, "target": y.to(self.device, non_blocking=True), "index": idx.to(self.device, non_blocking=True)}


class _EpochOrder(torch.utils.data.Sampler):
    """One process's shuffled order: a permutation drawn from (seed, epoch key) alone."""

    def __init__(self, loader: DatasetLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.dataset)

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.loader.seed * 1_000_003 + self.loader.epoch_key)
        return iter(torch.randperm(len(self.loader.dataset), generator=gen).tolist())


class _Shard(torch.utils.data.Sampler):
    """Rank ``rank``'s contiguous share of ``n`` evaluation samples (as ``torch.tensor_split`` shares
    them): every sample on exactly one rank, none repeated; shares differ by at most one sample."""

    def __init__(self, n: int, rank: int, world_size: int) -> None:
        from kdrun.data.arrays import shard_sizes

        sizes = shard_sizes(n, world_size)
        self.start, self.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))


class _Skip(torch.utils.data.Sampler):
    """The indices of an epoch's order from position ``start`` on."""

    def __init__(self, order: list[int], start: int) -> None:
        self.order = order[start:]

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)


def image_folder(root: str | None, image_size: int = 224, resize: int = 256, mean: list[float] = (0.485, 0.456, 0.406),
                 std: list[float] = (0.229, 0.224, 0.225), train_dir: str = "train", test_dir: str = "val") -> DatasetSplits:
    """An ImageNet-style folder (``root/train/<class>/*.jpg``, ``root/val/<class>/*.jpg``) with the
    standard transforms: RandomResizedCrop(image_size) + flip for training; Resize(resize) +
    CenterCrop(image_size) for evaluation; then normalisation with ``mean``/``std``."""
    from torchvision import datasets, transforms

    if root is None:
        raise KdrunError("data.root is not set: point it at a folder with train/ and val/ class folders")
    base = Path(root).expanduser()
    for sub in (train_dir, test_dir):
        if not (base / sub).is_dir():
            raise KdrunError(f"image folder: {base / sub} does not exist; data.root must contain {train_dir}/ and {test_dir}/ "
                             f"with one folder per class")
    norm = transforms.Normalize(list(mean), list(std))
    train_tf = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    test_tf = transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(image_size), transforms.ToTensor(), norm])
    return DatasetSplits(datasets.ImageFolder(str(base / train_dir), train_tf), datasets.ImageFolder(str(base / test_dir), test_tf))
