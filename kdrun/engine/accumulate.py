"""Global means over gradient-accumulation windows and data-parallel ranks.

An optimizer step sees K micro-batches (``trainer.accumulate_grad_batches``) on each of W ranks. Every
loss term returns the mean of its micro-batch, over what its class declares (``mean_over``): samples
(the default, every classic term) or the valid tokens counted from a batch mask (token-level terms).
The engine, not the term, owns the reduction: it scales micro-batch k's value on rank r by

    s_rk = W * n_rk / N,        N = sum over ranks and micro-batches of n_rk,

where n_rk counts the term's units in that micro-batch. The sum over the window of ``s_rk * mean_rk``
is ``W * (sum of the rank's per-unit losses) / N``, and DDP's average of the ranks' gradients removes
the W: the optimizer sees the gradient of the mean over every unit of the global window, never a mean
of micro-batch means (which over-weights micro-batches with few valid tokens). Without accumulation
and on one process, s = 1 and nothing is computed.

Sample counts are known on the host (every rank knows every rank's share of a global batch, from
:meth:`loader.rank_sizes`), so they cost nothing. Token counts are summed on the device and, under
DDP, all-reduced once per optimizer step (one small collective, no host synchronisation).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

from kdrun.engine.distributed import DistInfo, all_reduce_sum
from kdrun.experiment import LossSpec

Scale = Union[float, Tensor, None]  # None: use the term's value as it is


def window_scales(batches: Sequence[Mapping[str, Tensor]], rank_sizes: Sequence[Sequence[int]],
                  losses: Mapping[str, LossSpec], terms: Sequence[str], dist: DistInfo) -> list[dict[str, Scale]]:
    """Per micro-batch of the window, the factor ``s_rk`` of every term (see the module docstring).

    ``rank_sizes[k]`` lists the number of samples of micro-batch k on every rank."""
    k = len(batches)
    world = dist.world_size
    token_fields = sorted({losses[t].count_field for t in terms if losses[t].mean_over == "tokens"})
    if k == 1 and world == 1 and not token_fields:
        return [dict.fromkeys(terms)]
    per_kind: dict[str, list[Scale]] = {}
    total = sum(sum(sizes) for sizes in rank_sizes)
    mine = [sizes[dist.rank] for sizes in rank_sizes]
    samples = [world * n / total for n in mine]
    per_kind["samples"] = [None if s == 1.0 else s for s in samples]
    if token_fields:
        counts = torch.stack([torch.stack([(b[f] != 0).sum() for f in token_fields]) for b in batches]).double()
        window = all_reduce_sum(counts.sum(dim=0), dist).clamp_min(1.0)  # (fields,); no tokens at all: every term 0
        for i, f in enumerate(token_fields):
            per_kind[f"tokens:{f}"] = [world * counts[j, i] / window[i] for j in range(k)]

    def kind(t: str) -> str:
        spec = losses[t]
        return "samples" if spec.mean_over == "samples" else f"tokens:{spec.count_field}"

    return [{t: per_kind[kind(t)][j] for t in terms} for j in range(k)]


def scaled(value: Any, scale: Scale) -> Any:
    """``value`` (a tensor or a dict of parts) times ``scale`` (None: unchanged)."""
    if scale is None:
        return value
    if isinstance(value, dict):
        return {p: v * scale.to(v.dtype) if isinstance(scale, Tensor) else v * scale for p, v in value.items()}
    return value * scale.to(value.dtype) if isinstance(scale, Tensor) else value * scale
