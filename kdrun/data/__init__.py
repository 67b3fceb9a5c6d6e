"""Data sets kdrun serves: image arrays (CIFAR from torchvision or the offline copy, 8x8 digits,
synthetic) with an on-device batch loader, Dataset folders through a DataLoader, and named tensors
(token ids, masks) through :mod:`kdrun.data.tensors`; :mod:`kdrun.data.loaders` builds the loaders."""
from kdrun.data.arrays import ArrayLoader, ArraySplits
from kdrun.data.tensors import TensorLoader, TensorSplits


def is_splits(obj: object) -> bool:
    """Whether ``obj`` is a data set kdrun can serve (see :func:`kdrun.data.loaders.is_splits`)."""
    from kdrun.data.loaders import is_splits as check

    return check(obj)


__all__ = ["ArrayLoader", "ArraySplits", "TensorLoader", "TensorSplits", "is_splits"]
