"""Test-set evaluation: top-1 and top-5 accuracy, counted on the device and read once."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdrun.engine.distributed import DistInfo, all_reduce_sum
from kdrun.model_io import ModelIO, output_logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, dist_info: DistInfo | None = None,
             class_groups: dict[str, Tensor] | None = None, io: ModelIO | None = None,
             mask_field: str | None = None, prepare: Any = None, target_field: str = "target") -> dict[str, Any]:
    """:func:`evaluate_model`, with an op refused by ``trainer.deterministic=true`` (weighted ``bincount``
    of the per-class accuracies on CUDA) turned into one message."""
    from kdrun.engine.accelerate import deterministic_failure

    try:
        return evaluate_model(model, loader, dist_info, class_groups, io, mask_field, prepare, target_field)
    except RuntimeError as ex:
        failure = deterministic_failure(ex, f"the evaluation of {io.name if io is not None else 'a model'}"
                                            f"{' (many/medium/few-shot accuracy)' if class_groups else ''}")
        if failure is not None:
            raise failure from None
        raise


def evaluate_model(model: nn.Module, loader: Any, dist_info: DistInfo | None = None,
                   class_groups: dict[str, Tensor] | None = None, io: ModelIO | None = None,
                   mask_field: str | None = None, prepare: Any = None, target_field: str = "target") -> dict[str, Any]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``
    (under DDP each rank evaluates its shard and the counts are summed over ranks). ``io`` says how
    the model reads the batch and where its class scores are (default: ``model(batch.input)``).

    ``prepare`` maps each batch first (the batch transform's ``for_eval``).

    Scores per position (B, T, C) against targets (B, T) (next-token prediction) are counted over the
    positions where the batch field ``mask_field`` is non-zero (every position without one): top-1 is
    then the token accuracy, ``loss`` the mean token cross-entropy (nats) and ``ppl`` the perplexity
    ``exp(loss)``. ``target_field`` names the batch field of the targets (text data: ``labels``).

    ``class_groups`` (name -> boolean mask over classes, e.g. many/medium/few-shot) adds
    ``group_top1``: the top-1 accuracy over the test samples of each group's classes.
    """
    was_training = model.training
    model.eval()
    device = loader.device
    correct = torch.zeros(2, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    positions = torch.zeros((), dtype=torch.float64, device=device)  # counted positions of (B, T, C) scores
    per_class: Tensor | None = None  # rows: correct, seen
    bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)  # per confidence bin: count, confidence, correct
    per_position = False
    for batch in loader:
        if prepare is not None:
            batch = prepare(batch)
        logits = model(batch["input"]) if io is None else output_logits(io, io.call(model, batch))
        y = batch[target_field]
        if logits.dim() > 2:
            per_position = True
            mask = batch[mask_field] if mask_field else None
            hits, loss, n = _score_positions(logits, y, mask)
            bins += calibration_bins(logits.flatten(0, -2), y.flatten(), None if mask is None else mask.flatten())
            correct += hits
            loss_sum += loss
            positions += n
            continue
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        correct += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        count += y.shape[0]
        bins += calibration_bins(logits, y)
        if class_groups is not None:
            c = logits.shape[1]
            counts = torch.stack([torch.bincount(y, weights=hit[:, 0].double(), minlength=c),
                                  torch.bincount(y, minlength=c).double()])
            per_class = counts if per_class is None else per_class + counts
    model.train(was_training)
    totals = torch.cat([correct.double(), loss_sum.double()[None], (positions + float(count))[None]])
    if dist_info is not None:
        all_reduce_sum(totals, dist_info)
    if dist_info is not None:
        all_reduce_sum(bins, dist_info)
    hit1, hit5, loss, n = totals.tolist()
    n = max(n, 1.0)
    out: dict[str, Any] = {"top1": 100.0 * hit1 / n, "top5": 100.0 * hit5 / n, "loss": loss / n, "ece": ece_of(bins)}
    if per_position:
        out["ppl"] = math.exp(min(loss / n, 700.0))
    if class_groups is not None:
        out["group_top1"] = _group_top1(per_class, class_groups, dist_info)
    return out


@torch.no_grad()
def evaluate_terms(exp: Any, terms: list[str], loader: Any, dist_info: DistInfo | None = None, prepare: Any = None,
                   autocast: Any = None) -> dict[str, float]:
    """Loss terms ``terms`` (``trainer.monitor``) over ``loader``: every model they read runs in eval mode without
    autograd, and each term's value is averaged over what it averages over (its tokens, or its samples) across
    every batch and rank, as in training. Terms run in eval mode too (a term that updates state while training
    does not here)."""
    from contextlib import nullcontext

    from kdrun.names import gather, names_of, owner_of

    specs = [exp.losses[t] for t in terms]
    needed = list(dict.fromkeys(owner_of(n) for spec in specs for n in names_of(spec.inputs)
                                if owner_of(n) in exp.models))
    modes = {m: exp.models[m].training for m in needed} | {f"loss.{s.name}": s.module.training for s in specs}
    for m in needed:
        exp.models[m].eval()
    for spec in specs:
        spec.module.eval()
    sums = torch.zeros(2, len(specs), dtype=torch.float64, device=loader.device)  # value x units, units
    try:
        for batch in loader:
            if prepare is not None:
                batch = prepare(batch)
            ns: dict[str, Any] = {f"batch.{k}": v for k, v in batch.items()}
            with autocast() if autocast is not None else nullcontext():
                for m in needed:
                    exp.io[m].run(exp.models[m], batch, ns)
                for i, spec in enumerate(specs):
                    value = spec.module(**gather(ns, spec.inputs))
                    if isinstance(value, dict):
                        value = sum(value.values())
                    units = ((batch[spec.count_field] != 0).sum() if spec.mean_over == "tokens"
                             else torch.tensor(int(batch["index"].shape[0]), device=sums.device))
                    sums[0, i] += value.double() * units.double()
                    sums[1, i] += units.double()
    finally:
        for m in needed:
            exp.models[m].train(modes[m])
        for spec in specs:
            spec.module.train(modes[f"loss.{spec.name}"])
    if dist_info is not None:
        all_reduce_sum(sums, dist_info)
    values, units = sums.cpu().unbind(0)
    return {t: float(v / u) if u > 0 else float("nan") for t, v, u in zip(terms, values.tolist(), units.tolist())}


ECE_BINS = 15  # equal-width confidence bins (Guo et al., ICML 2017)


def calibration_bins(logits: Tensor, target: Tensor, mask: Tensor | None = None, bins: int = ECE_BINS) -> Tensor:
    """(3, bins) float64 sums per equal-width bin of the top-1 confidence ``max softmax``: the number of
    predictions, their confidences and how many are right (``mask``: which rows count)."""
    z = logits.float()
    conf, pred = z.softmax(dim=-1).max(dim=-1)
    w = torch.ones_like(conf, dtype=torch.float64) if mask is None else (mask != 0).double()
    right = (pred == target.clamp_min(0)).double() * w
    which = (conf.double() * bins).long().clamp_(0, bins - 1)
    out = torch.zeros(3, bins, dtype=torch.float64, device=z.device)
    out[0].index_add_(0, which, w)
    out[1].index_add_(0, which, conf.double() * w)
    out[2].index_add_(0, which, right)
    return out


def ece_of(bins: Tensor) -> float:
    """Expected calibration error in percent: ``sum_b (n_b / N) |acc_b - conf_b|`` (Naeini et al., AAAI 2015;
    15 bins as Guo et al., ICML 2017), from :func:`calibration_bins`."""
    n, conf, right = bins.double().cpu().unbind(0)
    total = float(n.sum())
    return 100.0 * float((conf - right).abs().sum()) / total if total > 0 else float("nan")


def _group_top1(per_class: Tensor | None, class_groups: dict[str, Tensor], dist_info: DistInfo | None) -> dict[str, float]:
    """Top-1 (percent) over the test samples of each group's classes, from per-class (correct, seen)."""
    if per_class is None:
        return {}
    if dist_info is not None:
        all_reduce_sum(per_class, dist_info)
    groups: dict[str, float] = {}
    for name, mask in class_groups.items():
        correct, seen = per_class[:, mask.to(per_class.device)].sum(dim=1).tolist()
        groups[name] = 100.0 * correct / seen if seen else float("nan")
    return groups


def _score_positions(logits: Tensor, target: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-1 and top-5 hits, summed cross-entropy and the number of counted positions (device tensors)."""
    z = logits.flatten(0, -2).float()
    y = target.flatten()
    w = torch.ones_like(y, dtype=torch.float64) if mask is None else (mask.flatten() != 0).double()
    y = y.clamp_min(0)  # ignored positions (-100) are masked out; any class id keeps the arithmetic valid
    top = z.topk(min(5, z.shape[1]), dim=1).indices
    hit = top == y[:, None]
    hits = torch.stack([(hit[:, 0].double() * w).sum(), (hit.any(dim=1).double() * w).sum()]).long()
    loss = (nn.functional.cross_entropy(z, y, reduction="none").double() * w).sum()
    return hits, loss.to(torch.float32), w.sum()
