"""CIFAR-LT: class counts of the exponential profile, first-images selection, the reference's seeded
selection, shot groups, the loader's metadata and the cifar100_lt data config."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kdrun.build import load_data
from kdrun.config import DataConfig
from kdrun.data.arrays import ArraySplits
from kdrun.data.longtail import class_counts, load_cifar_lt, long_tail_counts, long_tail_indices, shot_groups
from kdrun.paths import config_dir
from tests.conftest import compose_cfg


def _labels(per_class=500, classes=100, seed=0):
    """Synthetic labels, ``per_class`` of each class, in a shuffled (seeded) order."""
    g = torch.Generator().manual_seed(seed)
    return torch.arange(classes).repeat_interleave(per_class)[torch.randperm(per_class * classes, generator=g)]


@pytest.mark.parametrize("imbalance,total,last", [(100, 10_847, 5), (50, 12_608, 10), (10, 19_573, 50)])
def test_cifar100_lt_class_counts(imbalance, total, last):
    labels = _labels()
    idx = long_tail_indices(labels, imbalance, 100)
    counts = class_counts(labels[idx], 100)
    assert int(counts.sum()) == len(idx) == total
    assert int(counts[0]) == 500 and int(counts[99]) == last
    assert counts.tolist() == long_tail_counts(500, imbalance, 100)
    assert bool((counts[:-1] >= counts[1:]).all())  # non-increasing over classes


def test_counts_match_the_reference_formula():
    # LDAM-DRW: int(img_max * (imb_factor ** (cls_idx / (cls_num - 1.0)))) with imb_factor = 1 / IF
    ref = [int(500 * (0.01 ** (c / 99.0))) for c in range(100)]
    assert long_tail_counts(500, 100, 100) == ref
    assert long_tail_counts(5000, 100, 10)[:3] == [5000, 2997, 1796]  # CIFAR-10-LT
    assert long_tail_counts(500, 1, 100) == [500] * 100
    with pytest.raises(ValueError):
        long_tail_counts(500, 0.5, 100)


def test_keeps_the_first_images_of_each_class_in_order():
    labels = _labels(seed=1)
    idx = long_tail_indices(labels, 100, 100)
    assert torch.equal(idx, idx.sort().values) and idx.dtype == torch.long
    keep = long_tail_counts(500, 100, 100)
    for c in (0, 1, 50, 99):
        where = torch.nonzero(labels == c).flatten()
        assert torch.equal(idx[labels[idx] == c], where[: keep[c]])
    assert torch.equal(long_tail_indices(labels, 100, 100), idx)  # deterministic


def test_shuffle_seed_reproduces_the_reference_selection():
    labels = _labels(per_class=50, classes=10, seed=2)
    idx = long_tail_indices(labels, 10, 10, shuffle_seed=0)
    # the reference procedure, verbatim in spirit: global seed, one shuffle per class in class order
    state = np.random.get_state()
    try:
        np.random.seed(0)
        y = labels.numpy()
        ref = []
        for c, n in zip(np.unique(y), long_tail_counts(50, 10, 10)):
            where = np.where(y == c)[0]
            np.random.shuffle(where)
            ref.extend(where[:n].tolist())
    finally:
        np.random.set_state(state)
    assert idx.tolist() == sorted(ref)
    assert not torch.equal(idx, long_tail_indices(labels, 10, 10))  # differs from the first-images selection
    assert torch.equal(class_counts(labels[idx], 10), class_counts(labels[long_tail_indices(labels, 10, 10)], 10))


def test_rejects_labels_out_of_range():
    with pytest.raises(ValueError, match="labels"):
        long_tail_indices(torch.tensor([0, 1, 5]), 10, 3)


def test_shot_groups():
    counts = torch.tensor(long_tail_counts(500, 100, 100))
    groups = shot_groups(counts)
    assert [int(groups[k].sum()) for k in ("many", "medium", "few")] == [35, 35, 30]
    assert bool((groups["many"] | groups["medium"] | groups["few"]).all())
    assert not bool((groups["many"] & groups["medium"]).any() or (groups["medium"] & groups["few"]).any())
    edge = shot_groups(torch.tensor([101, 100, 20, 19]))
    assert edge["many"].tolist() == [True, False, False, False]
    assert edge["medium"].tolist() == [False, True, True, False]
    assert edge["few"].tolist() == [False, False, False, True]


def _fake_cifar100(root: Path, per_class=10, test_per_class=2):
    """A tiny CIFAR-100 array copy (train-00000-of-00001.npz + test.npz) with class-coded images."""
    rng = np.random.default_rng(0)

    def write(path, n_per):
        y = rng.permutation(np.repeat(np.arange(100), n_per)).astype(np.int64)
        x = np.zeros((len(y), 32, 32, 3), np.uint8)
        x[:, 0, 0, 0] = y  # the label, readable back from the image
        x[:, 0, 0, 1] = np.arange(len(y)) % 256
        np.savez(path, images=x, fine_labels=y)
        return y

    y = write(root / "train-00000-of-00001.npz", per_class)
    write(root / "test.npz", test_per_class)
    return y


def test_load_cifar_lt_attaches_metadata(tmp_path):
    y = _fake_cifar100(tmp_path)
    splits = load_cifar_lt(str(tmp_path), imbalance_factor=10)
    assert isinstance(splits, ArraySplits)
    keep = long_tail_counts(10, 10, 100)
    assert splits.train_class_counts.tolist() == keep and splits.train_class_counts.dtype == torch.long
    assert splits.kept_indices.tolist() == long_tail_indices(torch.from_numpy(y), 10, 100).tolist()
    assert splits.num_train == sum(keep)
    assert torch.equal(splits.train_labels, torch.from_numpy(y)[splits.kept_indices])
    assert torch.equal(splits.train_images[:, 0, 0, 0].long(), splits.train_labels)
    assert len(splits.test_labels) == 200  # test set untouched (balanced)
    assert splits.imbalance_factor == 10.0


def test_cifar100_lt_config_matches_cifar100_and_loads(tmp_path):
    lt = OmegaConf.load(Path(config_dir()) / "data" / "cifar100_lt.yaml")
    base = OmegaConf.load(Path(config_dir()) / "data" / "cifar100.yaml")
    assert list(lt) == list(base)
    assert lt.name == "cifar100_lt"
    for key in base:
        if key not in ("name", "source"):
            assert lt[key] == base[key], key
    assert lt.source._target_ == "kdrun.data.longtail.load_cifar_lt"
    assert lt.source.imbalance_factor == 100 and lt.source.variant == "cifar100"
    OmegaConf.merge(OmegaConf.structured(DataConfig), lt)  # the fixed schema accepts it

    # through the real builder, with data.root at a tiny fake copy
    _fake_cifar100(tmp_path)
    cfg = compose_cfg(["data=cifar100_lt", f"data.root={tmp_path}", "data.source.imbalance_factor=10"])
    splits = load_data(cfg)
    assert splits.train_class_counts.tolist() == long_tail_counts(10, 10, 100)
    assert len(splits.kept_indices) == splits.num_train
