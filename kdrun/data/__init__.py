"""Data sets as arrays (CIFAR from torchvision or the offline copy, 8x8 digits, synthetic) and the
batch loader that augments whole batches at once."""
from kdrun.data.arrays import ArrayLoader, ArraySplits

__all__ = ["ArrayLoader", "ArraySplits"]
