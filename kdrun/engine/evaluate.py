"""Test-set evaluation: top-1 and top-5 accuracy, counted on the device and read once."""
from __future__ import annotations

import torch
from torch import nn

from kdrun.data.arrays import ArrayLoader
from kdrun.engine.distributed import DistInfo, all_reduce_sum


@torch.no_grad()
def evaluate(model: nn.Module, loader: ArrayLoader, dist_info: DistInfo | None = None) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean cross-entropy of ``model`` over ``loader``
    (under DDP each rank evaluates its shard and the counts are summed over ranks)."""
    was_training = model.training
    model.eval()
    device = loader.device
    correct = torch.zeros(2, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), device=device)
    count = 0
    for batch in loader:
        logits = model(batch["input"])
        y = batch["target"]
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices
        hit = top == y[:, None]
        correct += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum()])
        loss_sum += nn.functional.cross_entropy(logits.float(), y, reduction="sum")
        count += y.shape[0]
    model.train(was_training)
    totals = torch.cat([correct.double(), loss_sum.double()[None], torch.tensor([float(count)], device=device, dtype=torch.float64)])
    if dist_info is not None:
        all_reduce_sum(totals, dist_info)
    hit1, hit5, loss, n = totals.tolist()
    hits = [hit1, hit5]
    n = max(n, 1.0)
    return {"top1": 100.0 * hits[0] / n, "top5": 100.0 * hits[1] / n, "loss": loss / n}
