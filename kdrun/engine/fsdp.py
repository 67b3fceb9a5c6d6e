"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for models that do not
fit one device: ``trainer.fsdp=true`` under torchrun.

Every model of the run is sharded over all ranks, frozen teachers included (no gradients and no optimizer
state, only sharded weights, gathered layer by layer for each forward). Each transformer layer is one FSDP
unit (the layer stack of a Hugging Face model, :func:`kdrun.models.hf.layer_stack`); whatever is left
(embeddings, final norm, head) is the root unit. Adapters and loss terms stay replicated and, when trainable,
are wrapped in DDP as without FSDP.

Gradients are reduce-scattered after each optimizer step's last micro-batch only
(``set_requires_gradient_sync``). Checkpoints and exported weights hold **full** tensors, gathered from the
shards on every rank and written by rank 0, so they load in any run, sharded or not, and a sharded run
resumes from them by re-sharding (``distribute_tensor``).

On-policy rollouts (:class:`kdrun.data.rollout.Rollout`) run on every rank with the sharded student, its
units gathered for the ``generate`` call or kept in step by ``synced_gpus``. The evaluation-time
``generation:`` block gathers the sharded models on every rank, and rank 0 generates alone while the others
wait (as under DDP, where rank 0 generates alone).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")


def _dtensor() -> Any:
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_models(models: Mapping[str, nn.Module], device: torch.device, world_size: int) -> None:
    """``fully_shard`` each model over a 1-D mesh of all ranks: its transformer layers, then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from kdrun.models.hf import layer_stack

    mesh = init_device_mesh(device.type, (world_size,))
    for name, model in models.items():
        stack = layer_stack(model)
        for layer in stack or []:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        log.info("fsdp: %s sharded over %d ranks (%d layer units + root)", name, world_size, len(stack or []))


def gather_full(obj: Any) -> Any:
    """``obj`` (a state dict, nested) with every sharded tensor gathered into a full CPU tensor. A collective:
    every rank must call it with the same structure, in the same order."""
    dtensor = _dtensor()
    if isinstance(obj, dtensor):
        return obj.full_tensor().detach().cpu()
    if isinstance(obj, Mapping):
        return {k: gather_full(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [gather_full(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(gather_full(v) for v in obj)
    return obj


def _shard_like(value: Any, like: Any) -> Any:
    from torch.distributed.tensor import distribute_tensor

    if isinstance(value, torch.Tensor) and not isinstance(value, _dtensor()) and tuple(value.shape) == tuple(like.shape):
        return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements)
    return value


def shard_state_dict(module: nn.Module, state: Mapping[str, Any]) -> dict[str, Any]:
    """A full state dict re-sharded for ``module``'s sharded parameters and buffers (the others as they are)."""
    dtensor = _dtensor()
    own = dict(module.state_dict())
    return {k: _shard_like(v, own[k]) if isinstance(own.get(k), dtensor) else v for k, v in state.items()}


def shard_optimizer_state(optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> dict[str, Any]:
    """A full optimizer state dict (as :func:`gather_full` made it) re-sharded like the optimizer's parameters."""
    dtensor = _dtensor()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out = dict(state)
    out["state"] = {}
    for idx, entry in state["state"].items():
        p = params[int(idx)]
        out["state"][idx] = ({k: _shard_like(v, p) for k, v in entry.items()} if isinstance(p, dtensor) else entry)
    return out


def set_gradient_sync(models: Iterable[nn.Module], sync: bool) -> None:
    """Turn the reduce-scatter of sharded models' gradients on (the window's last micro-batch) or off."""
    for m in models:
        if hasattr(m, "set_requires_gradient_sync"):
            m.set_requires_gradient_sync(sync)


def fsdp_units(model: Any) -> list[Any]:
    """The FSDP2 units of ``model`` (``fully_shard``-ed modules), none when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)] if isinstance(model, FSDPModule) else []


def reshard_all(models: Iterable[nn.Module]) -> None:
    """Every FSDP unit of ``models`` back on its shards. FSDP2 leaves a root unit unsharded after a forward that no
    backward follows (an evaluation, a frozen model's forward), and while it is, ``module.parameters()`` are its
    unsharded tensors: an optimizer built then (a later stage training the same model) would step copies that the
    next all-gather overwrites. Local: no collective."""
    for model in models:
        for unit in fsdp_units(model):
            unit.reshard()


@contextlib.contextmanager
def gathered(units: Sequence[Any]) -> Iterator[None]:
    """Every FSDP unit's full parameters gathered once, kept through the forwards of a generation (no
    collective per token, so ranks may stop at different lengths), then sharded again. A collective: every
    rank enters it together. Memory: the whole model on every rank while inside."""
    if not units:
        yield
        return
    units[0]._get_fsdp_state()._lazy_init()  # the root's own settings are fixed on its first forward
    groups = [g for u in units for g in u._get_fsdp_state()._fsdp_param_groups]
    saved = [g.post_forward_mesh_info for g in groups]
    for g in groups:
        g.post_forward_mesh_info = None  # no reshard after each forward
    try:
        for u in units:
            u.unshard()
        yield
    finally:
        for g, info in zip(groups, saved):
            g.post_forward_mesh_info = info
        for u in units:
            u.reshard()


def check_supported(cfg: Any, world_size: int) -> None:
    """The combinations ``trainer.fsdp=true`` refuses, each with the way out."""
    if world_size < 1:
        raise KdrunError("trainer.fsdp=true needs a distributed launch: torchrun --nproc_per_node=N -m kdrun ...")
    if cfg.rounds is not None:
        raise KdrunError("trainer.fsdp=true with rounds: self-distillation rounds rebuild the student; use DDP (trainer.fsdp=false)")
    if cfg.trainer.compile:
        raise KdrunError("trainer.fsdp=true with trainer.compile=true is not supported yet; set trainer.compile=false")


__all__ = ["check_supported", "gather_full", "set_gradient_sync", "shard_models", "shard_optimizer_state",
           "shard_state_dict"]
