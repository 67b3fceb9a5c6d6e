"""Training-set statistics that components ask for before they train: per-class means of a frozen model's
tensors (ND's teacher class centres, Wang et al., arXiv 2305.17007; TGeo-KD's class-average teacher
predictions, Hu et al., ICLR 2024).

For every component of a starting stage whose :meth:`~kdrun.component.Component.class_mean_inputs` is not
empty, :func:`fill_class_means` runs the models that own those tensors in eval mode, without autograd, over
the training set in order and without augmentation (each DDP rank its shard), sums
``component.class_mean_of(argument, tensor)`` per label with one ``index_add_`` per batch on the device,
all-reduces the sums and counts once, and hands the means to ``component.set_class_means``. Rank 0 writes
them to ``<run dir>/class_means/<term>.pt``. A class without a training sample gets a zero mean and a
warning.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdrun.component import Component
from kdrun.data.loaders import make_loader
from kdrun.engine.checkpoint import atomic_save
from kdrun.engine.distributed import DistInfo, all_reduce_sum
from kdrun.errors import KdrunError
from kdrun.experiment import Experiment
from kdrun.names import owner_of

log = logging.getLogger("kdrun")


def _requests(exp: Experiment, terms: Mapping[str, Component]) -> dict[str, dict[str, str]]:
    """{term: {argument: tensor name}} of the loss terms that still need class means."""
    out: dict[str, dict[str, str]] = {}
    for term, comp in terms.items():
        args = comp.class_mean_inputs()
        if not args:
            continue
        inputs = exp.losses[term].inputs
        names: dict[str, str] = {}
        for arg in args:
            name = inputs.get(arg)
            if not isinstance(name, str):
                raise KdrunError(f"loss.{term}: its class means need one tensor for the argument '{arg}', got {name!r}")
            owner = owner_of(name)
            if owner not in exp.models:
                raise KdrunError(f"loss.{term}: class means of '{name}' need a model's tensor (batch fields and "
                                 f"adapters are not averaged); read a model tap such as teacher.feat")
            names[arg] = name
        out[term] = names
    return out


@torch.no_grad()
def fill_class_means(exp: Experiment, terms: Mapping[str, Component], dist: DistInfo, run_dir: Path | None,
                     autocast: Any = contextlib.nullcontext, prepare: Any = None) -> None:
    """Compute and hand over the class means every loss term in ``terms`` still needs (see the module);
    ``autocast`` makes the context the models run in (the run's precision); ``prepare`` is what the
    stage's evaluation batches get (its transform's ``for_eval``; default: the run's)."""
    requests = _requests(exp, terms)
    if not requests:
        return
    start = time.perf_counter()
    prepare = prepare if prepare is not None else exp.eval_transform
    d = exp.cfg.data
    num_classes = int(d.num_classes)
    loader = make_loader(exp.data, "train", d, exp.device, train=False, seed=exp.cfg.seed, rank=dist.rank,
                         world_size=dist.world_size, channels_last=exp.cfg.trainer.channels_last)
    owners = sorted({owner_of(n) for names in requests.values() for n in names.values()})
    modes = {m: exp.models[m].training for m in owners}
    for m in owners:
        exp.models[m].eval()
    sums: dict[tuple[str, str], Tensor] = {}
    counts = torch.zeros(num_classes, device=exp.device, dtype=torch.float64)
    try:
        for batch in loader:
            if prepare is not None:
                batch = prepare(batch)
            ns: dict[str, Any] = {f"batch.{k}": v for k, v in batch.items()}
            with autocast():
                for m in owners:
                    exp.io[m].run(exp.models[m], batch, ns)
            labels = batch["target"].long()
            counts.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
            for term, names in requests.items():
                for arg, name in names.items():
                    value = terms[term].class_mean_of(arg, ns[name].float()).double()
                    key = (term, arg)
                    if key not in sums:
                        sums[key] = torch.zeros((num_classes, *value.shape[1:]), device=exp.device, dtype=torch.float64)
                    sums[key].index_add_(0, labels, value)
    finally:
        for m, training in modes.items():
            exp.models[m].train(training)
    all_reduce_sum(counts, dist)
    for v in sums.values():
        all_reduce_sum(v, dist)
    empty = int((counts == 0).sum())
    if empty:
        log.warning("class means: %d of %d classes have no training sample; their means are 0", empty, num_classes)
    per_class = counts.clamp_min(1)
    for term, names in requests.items():
        means = {arg: (sums[(term, arg)] / per_class.view(-1, *[1] * (sums[(term, arg)].dim() - 1))).float() for arg in names}
        terms[term].set_class_means(means)
        if run_dir is not None and dist.rank == 0:
            atomic_save({"means": {a: m.cpu() for a, m in means.items()}, "tensors": dict(names),
                         "counts": counts.cpu()}, Path(run_dir) / "class_means" / f"{term}.pt")
        log.info("class means for loss.%s: %s over %d training samples (%.1f s)", term,
                 ", ".join(f"{names[a]} {tuple(means[a].shape)}" for a in names), int(counts.sum()),
                 time.perf_counter() - start)

