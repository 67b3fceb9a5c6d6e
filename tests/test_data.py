"""Array data: loading, subsets, the batch loader's determinism and augmentation."""
import numpy as np
import pytest
import torch

from kdrun.data.arrays import ArrayLoader, ArraySplits, random_crop_flip
from kdrun.data.sources import load_cifar, load_digits, make_synthetic
from kdrun.errors import KdrunError
from tests.conftest import SHARED_CIFAR


def loader(splits, **kw):
    args = dict(batch_size=16, train=True, mean=[0.5] * 3, std=[0.25] * 3, device="cpu", seed=3,
                crop_padding=4, hflip=True)
    args.update(kw)
    return ArrayLoader(splits.train_images, splits.train_labels, **args)


def test_loader_is_a_function_of_seed_and_epoch():
    data = make_synthetic(num_train=50, num_test=10)
    a, b = loader(data), loader(data)
    a.set_epoch(7)
    b.set_epoch(7)
    for x, y in zip(a, b):
        assert torch.equal(x["input"], y["input"]) and torch.equal(x["index"], y["index"])
    b.set_epoch(8)
    assert not torch.equal(next(iter(a))["index"], next(iter(b))["index"])


def test_loader_covers_every_sample_once_per_epoch():
    data = make_synthetic(num_train=50, num_test=10)
    idx = torch.cat([b["index"] for b in loader(data)])
    assert sorted(idx.tolist()) == list(range(50))
    assert len(loader(data, drop_last=True)) == 3 and len(loader(data)) == 4
    labels = torch.cat([b["target"] for b in loader(data)])
    assert torch.equal(labels, data.train_labels[idx])


def test_eval_loader_normalises_without_augmenting():
    data = make_synthetic(num_train=8, num_test=8)
    ev = ArrayLoader(data.test_images, data.test_labels, batch_size=8, train=False, mean=[0.5] * 3,
                     std=[0.25] * 3, device="cpu", crop_padding=4, hflip=True)
    x = next(iter(ev))["input"]
    expected = (data.test_images.float() / 255 - 0.5) / 0.25
    assert torch.allclose(x, expected, atol=1e-5)


def test_random_crop_is_a_shifted_window_of_the_padded_image():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.uint8).view(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, padding=2, hflip=False, generator=gen)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # every output must equal some 4x4 window of the padded input
        windows = [padded[i, :, r:r + 4, c:c + 4] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) for w in windows)
    same = random_crop_flip(x, padding=0, hflip=False, generator=gen)
    assert torch.equal(same, x)
    flips = [random_crop_flip(x, 0, True, gen) for _ in range(20)]
    assert all(torch.equal(f[i], x[i]) or torch.equal(f[i], x[i].flip(2)) for f in flips for i in range(2))
    assert any(not torch.equal(f, x) for f in flips)


def _sorted_by_class(num_classes=10, per_class=20):
    """Images whose labels are sorted by class, as the offline CIFAR-100 test split and ImageFolders are."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = torch.randint(0, 255, (len(labels), 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return images, labels


def test_subset_is_class_stratified_seeded_and_proportional_on_sorted_data():
    x, y = _sorted_by_class(10, 20)  # 200 training images, sorted by class
    xt, yt = _sorted_by_class(10, 8)  # 80 test images, sorted by class
    data = ArraySplits(x, y, xt, yt)
    sub = data.subset(50)
    # 5 of each class in training, 2 of each in the (proportional: 20) test examples; the first 50 would be 3 classes
    assert torch.bincount(sub.train_labels, minlength=10).tolist() == [5] * 10
    assert torch.bincount(sub.test_labels, minlength=10).tolist() == [2] * 10
    assert sub.class_coverage == {"train": 10, "test": 10}
    again, other = data.subset(50), data.subset(50, seed=1)
    assert torch.equal(again.train_images, sub.train_images)  # seeded: the same examples every time
    assert not torch.equal(other.train_images, sub.train_images)
    # uneven classes get their share, give or take one; a subset smaller than the class count covers n classes
    uneven = ArraySplits(x[30:], y[30:], xt, yt)  # class 0 gone, class 1 has 10 of 20
    counts = torch.bincount(uneven.subset(34).train_labels, minlength=10)
    share = torch.bincount(y[30:], minlength=10).double() * 34 / 170
    assert counts.sum() == 34 and ((counts - share).abs() <= 1).all() and counts[0] == 0
    assert data.subset(7).class_coverage["train"] == 7


def test_tensor_and_dataset_subsets_are_stratified(tmp_path):
    from kdrun.data.datasets import DatasetSplits
    from kdrun.data.tensors import TensorSplits

    _, y = _sorted_by_class(4, 10)
    tensors = TensorSplits({"x": torch.arange(40.0)[:, None], "target": y}, {"x": torch.arange(40.0)[:, None], "target": y})
    assert torch.bincount(tensors.subset(8).train["target"]).tolist() == [2] * 4
    tokens = TensorSplits({"input_ids": torch.arange(40)[:, None]}, {"input_ids": torch.arange(40)[:, None]})
    ids = tokens.subset(10).train["input_ids"].flatten()
    assert ids.tolist() != list(range(10)) and len(set(ids.tolist())) == 10  # a seeded choice, not the first 10
    assert tokens.class_coverage == {"train": None, "test": None}

    class Labelled(torch.utils.data.Dataset):
        targets = y.tolist()

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            return torch.zeros(1), self.targets[i]

    ds = DatasetSplits(Labelled(), Labelled()).subset(8)
    assert sorted(ds.train[i][1] for i in range(8)) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_digits_split_is_fixed():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.shape[1:] == (1, 8, 8) and len(a.train_labels) + len(a.test_labels) == 1797


def test_bad_arrays_are_rejected():
    with pytest.raises(ValueError, match="uint8"):
        ArraySplits(torch.zeros(2, 3, 4, 4), torch.zeros(2), torch.zeros(1, 3, 4, 4, dtype=torch.uint8), torch.zeros(1))


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(KdrunError) as info:
        load_cifar(str(tmp_path), "cifar100")
    assert str(tmp_path) in str(info.value) and "data.root" in str(info.value)


def test_npz_layout_is_recognised(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train-0-of-2.npz", 6), ("train-1-of-2.npz", 4), ("test.npz", 5)):
        np.savez(tmp_path / name, images=rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8),
                 fine_labels=rng.integers(0, 100, n, dtype=np.uint8), coarse_labels=np.zeros(n, np.uint8))
    data = load_cifar(str(tmp_path), "cifar100")
    assert data.train_images.shape == (10, 3, 32, 32) and data.test_labels.dtype == torch.int64


@pytest.mark.skipif(not (SHARED_CIFAR / "test.npz").is_file(), reason="offline CIFAR-100 copy (../shared/data/cifar100) absent")
def test_offline_cifar100_copy_reads():
    with np.load(SHARED_CIFAR / "test.npz") as z:
        assert z["images"].shape == (10000, 32, 32, 3)
    data = load_cifar(str(SHARED_CIFAR), "cifar100")
    assert data.train_images.shape == (50000, 3, 32, 32) and data.test_images.shape == (10000, 3, 32, 32)
    assert torch.bincount(data.test_labels, minlength=100).tolist() == [100] * 100
    mean = data.train_images[:5000].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.5071, 0.4865, 0.4409]), atol=0.01)


def test_image_folder_through_the_dataloader_path(tmp_path):
    from PIL import Image

    from kdrun.data.datasets import DatasetLoader, image_folder

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / split / cls / f"{i}.png")
    splits = image_folder(str(tmp_path), image_size=16, resize=18)
    assert splits.num_train == 6 and splits.sample_batch(2)["input"].shape == (2, 3, 16, 16)
    loader = DatasetLoader(splits.train, batch_size=4, train=True, device="cpu", seed=1, num_workers=0)
    loader.set_epoch(3)
    first = [b["index"].tolist() for b in loader]
    again = [b["index"].tolist() for b in loader]
    assert first == again and sorted(sum(first, [])) == list(range(6)) and len(loader) == 2
    assert splits.subset(3).num_train == 3
    with pytest.raises(KdrunError, match="val"):
        image_folder(str(tmp_path / "train"))


def test_ranks_serve_disjoint_halves_of_each_global_batch_augmented_as_alone():
    data = make_synthetic(num_train=40, num_test=10)
    alone = loader(data, batch_size=8)
    ranks = [loader(data, batch_size=8, rank=r, world_size=2) for r in (0, 1)]
    for ld in (alone, *ranks):
        ld.set_epoch(5)
    for full, part0, part1 in zip(alone, *ranks):
        assert len(part0["index"]) == len(part1["index"]) == 4
        assert torch.equal(torch.cat([part0["index"], part1["index"]]), full["index"])
        assert torch.equal(torch.cat([part0["input"], part1["input"]]), full["input"])


def test_ddp_evaluation_shards_count_every_test_sample_once():
    """Two ranks' evaluation loaders of a Dataset source cover the 7 test items exactly once between them
    (DistributedSampler would pad rank 1 with a duplicate, counted in top-1)."""
    from kdrun.data.datasets import DatasetLoader

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return 7

        def __getitem__(self, i):
            return torch.zeros(1), i % 3

    seen = []
    for rank in (0, 1):
        loader = DatasetLoader(Items(), batch_size=4, train=False, device="cpu", num_workers=0, rank=rank, world_size=2)
        seen += [i for b in loader for i in b["index"].tolist()]
    assert sorted(seen) == list(range(7))
