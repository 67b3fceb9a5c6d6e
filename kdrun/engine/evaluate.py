"""Test-set evaluation: top-1 and top-5 accuracy, counted on the device and read once."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from kdrun.engine.distributed import DistInfo, all_reduce_sum
from kdrun.model_io import ModelIO, output_logits


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, dist_info: DistInfo | None = None,
             class_groups: dict[str, Tensor] | None = None, io: ModelIO | None = None) -> dict[str, Any]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``
    (under DDP each rank evaluates its shard and the counts are summed over ranks). ``io`` says how
    the model reads the batch and where its class scores are (default: ``model(batch.input)``).

    ``class_groups`` (name -> boolean mask over classes, e.g. many/medium/few-shot) adds
    ``group_top1``: the top-1 accuracy over the test samples of each group's classes.
    """
    was_training = model.training
    model.eval()
    device = loader.device
    correct = torch.zeros(2, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    per_class: Tensor | None = None  # rows: correct, seen
    for batch in loader:
        logits = model(batch["input"]) if io is None else output_logits(io, io.call(model, batch))
        y = batch["target"]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        correct += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        count += y.shape[0]
        if class_groups is not None:
            c = logits.shape[1]
            counts = torch.stack([torch.bincount(y, weights=hit[:, 0].double(), minlength=c),
                                  torch.bincount(y, minlength=c).double()])
            per_class = counts if per_class is None else per_class + counts
    model.train(was_training)
    totals = torch.cat([correct.double(), loss_sum.double()[None], torch.tensor([float(count)], device=device, dtype=torch.float64)])
    if dist_info is not None:
        all_reduce_sum(totals, dist_info)
    hit1, hit5, loss, n = totals.tolist()
    hits = [hit1, hit5]
    n = max(n, 1.0)
    groups: dict[str, float] = {}
    if class_groups is not None and per_class is not None:
        if dist_info is not None:
            all_reduce_sum(per_class, dist_info)
        for name, mask in class_groups.items():
            correct, seen = per_class[:, mask.to(per_class.device)].sum(dim=1).tolist()
            groups[name] = 100.0 * correct / seen if seen else float("nan")
    out: dict[str, Any] = {"top1": 100.0 * hits[0] / n, "top5": 100.0 * hits[1] / n, "loss": loss / n}
    if class_groups is not None:
        out["group_top1"] = groups
    return out
