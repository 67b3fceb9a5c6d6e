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

    def subset(self, n: int) -> DatasetSplits:
        """The first ``n`` training items and a proportional slice of the test set."""
        n_train, n_test = self.num_train, len(self.test)  # type: ignore[arg-type]
        n = max(1, min(int(n), n_train))
        return DatasetSplits(Subset(self.train, range(n)), Subset(self.test, range(max(1, math.ceil(n_test * n / n_train)))))

    def validation_split(self, n: int, seed: int = 0) -> DatasetSplits:
        """Hold out ``n`` training items (seeded) as the evaluation set instead of the test set.

        The held-out items keep the training transforms (augmentation included) of the training set."""
        total = self.num_train
        if not 0 < n < total:
            raise ValueError(f"data.val_split must be between 1 and {total - 1}, got {n}")
        perm = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
        return DatasetSplits(Subset(self.train, perm[n:].sort().values.tolist()), Subset(self.train, perm[:n].sort().values.tolist()))

    def probe_batch(self, k: int = 2) -> tuple[Tensor, Tensor]:
        """``k`` test items as a batch (inputs, labels) for the builder's probe forward."""
        items = [self.test[i] for i in range(min(k, len(self.test)))]  # type: ignore[arg-type]
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


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
        self.sampler = (DistributedSampler(self.dataset, world_size, rank, shuffle=train, seed=self.seed, drop_last=drop_last and train)
                        if world_size > 1 else None)
        self.loader = DataLoader(self.dataset, batch_size=batch_size // world_size, sampler=self.sampler,
                                 shuffle=train and self.sampler is None, drop_last=drop_last and train,
                                 num_workers=num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=num_workers > 0, generator=self.generator)
        self.epoch_key = 0

    def __len__(self) -> int:
        n = len(self.loader)
        return min(n, self.max_batches) if self.max_batches else n

    def set_epoch(self, key: int) -> None:
        self.epoch_key = int(key)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch_key)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        self.generator.manual_seed(self.seed * 1_000_003 + self.epoch_key)
        for i, (x, y, idx) in enumerate(self.loader):
            if self.max_batches and i >= self.max_batches:
                break
            yield {"input": x.to(self.device, non_blocking=True), "target": y.to(self.device, non_blocking=True),
                   "index": idx.to(self.device, non_blocking=True)}


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
