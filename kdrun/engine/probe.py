"""Linear-probe evaluation of a model's frozen features.

The representation-learning protocol (as in Sarnthein et al., "Random Teachers are Good
Teachers", ICML 2023, whose code standardises the features and trains the probe for 10 epochs):
features ``model.<tap>`` (flattened) of the unaugmented training set and of the test set are
extracted once in eval mode, standardised with the training set's mean and standard deviation, and
a linear classifier is trained on them with Adam (``epochs``, ``lr``, ``weight_decay``, mini-batches
of ``batch_size`` drawn on the device); the result is its test top-1 (percent).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdrun.data.arrays import ArrayLoader
from kdrun.data.datasets import DatasetLoader, DatasetSplits

if TYPE_CHECKING:
    from kdrun.build import Pipeline


@torch.no_grad()
def extract(pipe: Pipeline, model_name: str, tap: str, loader: Any) -> tuple[Tensor, Tensor]:
    """Features ``model.<tap>`` (B, D) and labels of every batch of ``loader`` (eval mode)."""
    model, recorder = pipe.models[model_name], pipe.recorders[model_name]
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in loader:
        model(batch["input"])
        feats.append(recorder.pop()[tap].flatten(1).float())
        labels.append(batch["target"])
    model.train(was_training)
    return torch.cat(feats), torch.cat(labels)


def fit_linear_probe(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, num_classes: int, *,
                     epochs: int = 30, lr: float = 0.01, weight_decay: float = 0.0, batch_size: int = 512,
                     seed: int = 0) -> dict[str, float]:
    """Train a linear classifier on standardised features; return train and test top-1 (percent)."""
    mean, std = train_x.mean(0, keepdim=True), train_x.std(0, keepdim=True).clamp_min(1e-6)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    gen = torch.Generator(device="cpu").manual_seed(seed)
    head = nn.Linear(train_x.shape[1], num_classes).to(train_x.device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.reset_parameters()
    opt = torch.optim.Adam(head.parameters(), lr=lr, weight_decay=weight_decay)
    n = train_x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(train_x.device)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            loss = F.cross_entropy(head(train_x[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        train_top1 = (head(train_x).argmax(1) == train_y).float().mean().item() * 100
        test_top1 = (head(test_x).argmax(1) == test_y).float().mean().item() * 100
    return {"probe_top1": test_top1, "probe_train_top1": train_top1}


def linear_probe(pipe: Pipeline) -> dict[str, Any]:
    """The ``probe`` of the config for each of its models, on ``pipe``'s data (whole sets, on every
    rank alike): ``{probe_top1, probe_train_top1` (the first model's), probe: {model: top1}}``."""
    cfg, d = pipe.cfg.probe, pipe.cfg.data
    if isinstance(pipe.data, DatasetSplits):
        train = DatasetLoader(pipe.data.train, batch_size=d.eval_batch_size, train=False, device=pipe.device,
                              seed=pipe.cfg.seed, num_workers=d.num_workers)
        test = DatasetLoader(pipe.data.test, batch_size=d.eval_batch_size, train=False, device=pipe.device,
                             seed=pipe.cfg.seed, num_workers=d.num_workers)
    else:
        common = dict(mean=list(d.mean), std=list(d.std), device=pipe.device, batch_size=d.eval_batch_size, train=False)
        train = ArrayLoader(pipe.data.train_images, pipe.data.train_labels, **common)
        test = ArrayLoader(pipe.data.test_images, pipe.data.test_labels, **common)
        train.channels_last = test.channels_last = bool(pipe.cfg.trainer.channels_last)
    out: dict[str, Any] = {"probe": {}}
    for i, name in enumerate(cfg.models):
        tx, ty = extract(pipe, name, cfg.tap, train)
        vx, vy = extract(pipe, name, cfg.tap, test)
        with torch.enable_grad():
            res = fit_linear_probe(tx, ty, vx, vy, int(d.num_classes), epochs=int(cfg.epochs), lr=float(cfg.lr),
                                   weight_decay=float(cfg.weight_decay), batch_size=int(cfg.batch_size),
                                   seed=int(pipe.cfg.seed))
        out["probe"][str(name)] = res["probe_top1"]
        if i == 0:
            out.update(res)
    return out
