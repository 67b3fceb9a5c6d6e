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

from kdrun.data.loaders import make_loader

if TYPE_CHECKING:
    from kdrun.experiment import Experiment


@torch.no_grad()
def extract(experiment: Experiment, model_name: str, tap: str, loader: Any) -> tuple[Tensor, Tensor]:
    """Features ``model.<tap>`` (B, D) and labels of every batch of ``loader`` (eval mode)."""
    model, io = experiment.models[model_name], experiment.io[model_name]
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for batch in loader:
        if experiment.eval_transform is not None:
            batch = experiment.eval_transform(batch)
        ns: dict[str, Tensor] = {}
        io.run(model, batch, ns)
        feats.append(ns[f"{model_name}.{tap}"].flatten(1).float())
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


def linear_probe(experiment: Experiment) -> dict[str, Any]:
    """The ``probe`` of the config for each of its models, on the experiment's data (whole sets, on
    every rank alike): ``{probe_top1, probe_train_top1`` (the first model's), ``probe: {model: top1}}``."""
    cfg, d = experiment.cfg.probe, experiment.cfg.data
    assert cfg is not None
    common = dict(train=False, seed=experiment.cfg.seed, channels_last=experiment.cfg.trainer.channels_last)
    train = make_loader(experiment.data, "train", d, experiment.device, **common)
    test = make_loader(experiment.data, "test", d, experiment.device, **common)
    out: dict[str, Any] = {"probe": {}}
    for i, name in enumerate(cfg.models):
        tx, ty = extract(experiment, name, cfg.tap, train)
        vx, vy = extract(experiment, name, cfg.tap, test)
        with torch.enable_grad():
            res = fit_linear_probe(tx, ty, vx, vy, int(d.num_classes), epochs=cfg.epochs, lr=cfg.lr,
                                   weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, seed=experiment.cfg.seed)
        out["probe"][str(name)] = res["probe_top1"]
        if i == 0:
            out.update(res)
    return out
