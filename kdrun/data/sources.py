"""Where array data sets come from: CIFAR (torchvision folder or the offline array copy), the 8x8
digits that ship with scikit-learn, synthetic images of any shape (each returns
:class:`~kdrun.data.arrays.ArraySplits`), and synthetic token sequences
(:class:`~kdrun.data.tensors.TensorSplits`). Each raises :class:`~kdrun.errors.KdrunError` with the places
it looked when the files are missing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdrun.data.arrays import ArraySplits
from kdrun.data.tensors import TensorSplits
from kdrun.errors import KdrunError

_TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


def load_cifar(root: str | None, variant: str = "cifar100", download: bool = False) -> ArraySplits:
    """CIFAR-10/100 from ``root``, recognising the layout from the files present.

    - array copy: ``train-*-of-*.npz`` + ``test.npz`` with ``images`` (N, 32, 32, 3) uint8 and
      ``fine_labels`` (CIFAR-100) or ``labels`` (CIFAR-10);
    - torchvision: ``cifar-100-python/`` (or ``cifar-10-batches-py/``) in ``root`` or as ``root``
      itself; with ``download=True`` torchvision fetches it when absent.
    """
    if variant not in _TORCHVISION_FOLDERS:
        raise KdrunError(f"data.source.variant must be cifar10 or cifar100, got '{variant}'")
    if root is None:
        raise KdrunError(f"data.root is not set: point it at the {variant} files, e.g. data.root=/path/to/{variant}")
    path = Path(root).expanduser()
    shards = sorted(path.glob("train-*-of-*.npz"))
    if shards and (path / "test.npz").is_file():
        return _load_npz(shards, path / "test.npz", variant)
    folder = _TORCHVISION_FOLDERS[variant]
    for base in (path, path.parent):
        if (base / folder).is_dir():
            return _load_torchvision(base, variant, download=False)
    if download:
        return _load_torchvision(path, variant, download=True)
    raise KdrunError(
        f"{variant} not found: looked for train-*-of-*.npz + test.npz in {path}, and for the torchvision "
        f"folder {path / folder}. Point data.root at either, or add data.source.download=true to let "
        f"torchvision download it."
    )


def _load_npz(shards: list[Path], test: Path, variant: str) -> ArraySplits:
    key = "fine_labels" if variant == "cifar100" else "labels"

    def read(files: list[Path]) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for f in files:
            with np.load(f, allow_pickle=False) as z:
                if key not in z:
                    raise KdrunError(f"{f}: no '{key}' array (has {', '.join(z.files)}); is this {variant}?")
                xs.append(z["images"])
                ys.append(z[key])
        x = torch.from_numpy(np.concatenate(xs)).permute(0, 3, 1, 2).contiguous()
        return x, torch.from_numpy(np.concatenate(ys).astype(np.int64))

    return ArraySplits(*read(shards), *read([test]))


def _load_torchvision(root: Path, variant: str, download: bool) -> ArraySplits:
    from torchvision import datasets

    cls = datasets.CIFAR100 if variant == "cifar100" else datasets.CIFAR10
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except RuntimeError as ex:  # torchvision's "Dataset not found or corrupted"
        raise KdrunError(f"{variant} in {root}: {ex}") from None

    def arrays(ds) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(),
                torch.tensor(ds.targets, dtype=torch.int64))

    return ArraySplits(*arrays(train), *arrays(test))


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> ArraySplits:
    """scikit-learn's 8x8 handwritten digits (1,797 images, 10 classes), split once with a fixed seed.

    Pixel values 0..16 are scaled to 0..255 and stored as uint8 (1, 8, 8) images.
    """
    from sklearn.datasets import load_digits as sk_digits

    digits = sk_digits()
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(split_seed).permutation(len(labels))
    n_test = int(round(len(labels) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    x, y = torch.from_numpy(images), torch.from_numpy(labels)
    return ArraySplits(x[train], y[train], x[test], y[test])


def make_synthetic(num_train: int = 256, num_test: int = 64, shape: list[int] = (3, 32, 32),
                   num_classes: int = 10, seed: int = 0, signal: float = 0.5) -> ArraySplits:
    """Random images whose class shifts the mean of one colour block, so models can learn them.

    Args:
        num_train, num_test: sample counts. shape: (C, H, W). num_classes: classes.
        seed: generator seed (same data for the same arguments). signal: strength of the class cue
            (0 gives pure noise).
    """
    gen = torch.Generator().manual_seed(seed)
    c, h, w = (int(s) for s in shape)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, num_classes, (n,), generator=gen)
        x = torch.rand(n, c, h, w, generator=gen) * (1 - signal)
        # class cue: a bright patch whose position encodes the label
        cells = max(1, int(np.ceil(np.sqrt(num_classes))))
        ph, pw = max(1, h // cells), max(1, w // cells)
        rows = (y // cells) * ph
        cols = (y % cells) * pw
        r = torch.arange(h)[None, :, None]
        q = torch.arange(w)[None, None, :]
        mask = (r >= rows[:, None, None]) & (r < rows[:, None, None] + ph) & (q >= cols[:, None, None]) & (q < cols[:, None, None] + pw)
        x = x + signal * mask[:, None].float()
        return (x.clamp(0, 1) * 255).to(torch.uint8), y

    return ArraySplits(*draw(num_train), *draw(num_test))


def make_synthetic_tokens(num_train: int = 256, num_test: int = 64, seq_len: int = 16, vocab_size: int = 32,
                          min_len: int = 4, seed: int = 0) -> TensorSplits:
    """Token sequences a small model can learn, of random lengths (padding after each sequence's end).

    Sequence i counts from a random token s_i in steps of d_i in {1, 2, 3}, modulo the vocabulary
    (token 0 is padding and never occurs inside a sequence): ``x_t = 1 + (s_i - 1 + t d_i) mod (V - 1)``
    for t < L_i, with L_i uniform in [min_len, seq_len]. Fields (each (N, seq_len)): ``input_ids``;
    ``target``, the next token of each position; ``loss_mask``, true where a next token exists
    (t < L_i - 1), so that micro-batches hold different numbers of valid tokens.
    """
    if vocab_size < 3 or not 2 <= min_len <= seq_len:
        raise KdrunError(f"synthetic tokens: need vocab_size >= 3 and 2 <= min_len <= seq_len, got {vocab_size}, "
                         f"{min_len}, {seq_len}")
    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> dict[str, torch.Tensor]:
        start = torch.randint(1, vocab_size, (n, 1), generator=gen)
        step = torch.randint(1, 4, (n, 1), generator=gen)
        length = torch.randint(min_len, seq_len + 1, (n, 1), generator=gen)
        t = torch.arange(seq_len + 1)[None, :]
        tokens = 1 + (start - 1 + t * step) % (vocab_size - 1)
        tokens = torch.where(t < length, tokens, torch.zeros_like(tokens))
        return {"input_ids": tokens[:, :-1].contiguous(), "target": tokens[:, 1:].contiguous(),
                "loss_mask": t[:, :-1] < length - 1}

    return TensorSplits(draw(num_train), draw(num_test))


def load_digits_two_views(test_fraction: float = 0.2, split_seed: int = 0) -> TensorSplits:
    """scikit-learn's 8x8 digits as two modalities: ``view1`` the left four columns of each image and
    ``view2`` the right four, each flattened (32 values, pixels scaled to [0, 1]), with ``target``; the
    same split as :func:`load_digits`. Each view alone classifies worse than both together, the setting
    of cross-modal distillation (a two-view teacher, a one-view student)."""
    digits = load_digits(test_fraction, split_seed)

    def views(images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images[:, 0].float() / 255.0  # (N, 8, 8)
        return {"view1": x[:, :, :4].reshape(len(x), -1).contiguous(), "view2": x[:, :, 4:].reshape(len(x), -1).contiguous(),
                "target": labels}

    return TensorSplits(views(digits.train_images, digits.train_labels), views(digits.test_images, digits.test_labels))
