"""One factory for every loader: the training loader, the test loader, and the unaugmented training
set of the linear probe, whatever the kind of data set."""
from __future__ import annotations

from typing import Any

import torch

from kdrun.data.arrays import ArrayLoader, ArraySplits
from kdrun.data.datasets import DatasetLoader, DatasetSplits
from kdrun.data.tensors import TensorLoader, TensorSplits
from kdrun.schema import DataConfig

SPLITS = (ArraySplits, DatasetSplits, TensorSplits)


def is_splits(obj: Any) -> bool:
    """Whether ``obj`` is a data set kdrun can serve."""
    return isinstance(obj, SPLITS)


def make_loader(splits: Any, part: str, data: DataConfig, device: torch.device, *, train: bool, seed: int = 0,
                rank: int = 0, world_size: int = 1, batch_size: int | None = None, max_batches: int | None = None,
                channels_last: bool = False) -> Any:
    """A loader over the ``part`` (``train`` or ``test``) of ``splits``: shuffled and augmented when
    ``train``, else in order; ``batch_size`` defaults to ``data.batch_size`` for training and
    ``data.eval_batch_size`` otherwise (the global batch, shared by ``world_size`` ranks)."""
    size = batch_size or (data.batch_size if train else data.eval_batch_size)
    common = dict(batch_size=size, train=train, device=device, seed=seed, rank=rank, world_size=world_size,
                  max_batches=max_batches, drop_last=data.drop_last and train)
    if isinstance(splits, DatasetSplits):
        loader = DatasetLoader(getattr(splits, part), num_workers=data.num_workers, **common)
        loader.channels_last = bool(channels_last)
        return loader
    if isinstance(splits, TensorSplits):
        return TensorLoader(getattr(splits, part), trim_field=splits.trim_field,
                            cache=splits.cache if part == "train" else None, group=splits.group, **common)
    images, labels = (splits.train_images, splits.train_labels) if part == "train" else (splits.test_images, splits.test_labels)
    loader = ArrayLoader(images, labels, mean=data.mean, std=data.std, crop_padding=data.crop_padding, hflip=data.hflip,
                         **common)
    loader.channels_last = bool(channels_last)
    return loader
