"""The built experiment: everything the engine needs, instantiated from the config by :mod:`kdrun.build`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdrun.model_io import ModelIO
from kdrun.names import Inputs
from kdrun.plan import GroupPlan
from kdrun.schema import ExperimentConfig, StageConfig


@dataclass
class LossSpec:
    """A weighted loss term reading named tensors (``inputs``: forward argument -> name(s)).

    ``mean_over`` is what the term's value averages over (``samples``, or ``tokens`` counted from the
    batch field ``count_field``); the engine uses it to keep means global under gradient accumulation
    and data parallelism (:mod:`kdrun.engine.accumulate`)."""

    name: str
    module: nn.Module
    weight: float
    inputs: Inputs
    warmup_epochs: int = 0
    mean_over: str = "samples"
    count_field: str | None = None
    warmup_offset: int = 1


@dataclass
class AdapterSpec:
    """A module fed by named tensors that publishes ``adapters.<name>``."""

    name: str
    module: nn.Module
    inputs: Inputs
    trainable: bool = True


@dataclass
class StagePlan:
    """What one stage runs: models (frozen ones first), adapters in order, loss terms, what trains.

    ``eval_model`` is None for a stage that trains no model and names none to evaluate."""

    name: str
    epochs: int | None
    max_steps: int | None
    trained_models: list[str]
    frozen_models: list[str]
    adapters: list[str]
    losses: list[str]
    eval_model: str | None
    cfg: StageConfig
    groups: list[GroupPlan] = field(default_factory=list)
    batch_transform: Any = None  # the stage's own `batch_transform`, else the run's (set by the builder)
    eval_transform: Any = None  # what evaluation batches of this stage get (the transform's for_eval), or None


@dataclass
class Experiment:
    """Everything the engine needs, built from an :class:`~kdrun.schema.ExperimentConfig`.

    ``forwards`` is what the training step calls for each model: the model itself, or its compiled
    forward (the engine replaces it once, before training). ``io`` says how each model is called and
    how its outputs and taps are named."""

    cfg: ExperimentConfig
    device: torch.device
    data: Any  # ArraySplits | DatasetSplits | TensorSplits
    models: nn.ModuleDict
    io: dict[str, ModelIO]
    adapters: dict[str, AdapterSpec]
    losses: dict[str, LossSpec]
    stages: list[StagePlan]
    random_models: list[str] = field(default_factory=list)  # frozen somewhere, never loaded nor trained
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    forwards: dict[str, Any] = field(default_factory=dict)
    batch_transform: Any = None  # batch -> batch, applied before every model in training (mixup, one-hot targets)
    eval_transform: Any = None  # batch -> batch on evaluation batches (the transform's for_eval), or None
    sync_batchnorm: bool = False
    sharded: bool = False  # models sharded by FSDP (trainer.fsdp): checkpoints gather full tensors on every rank

    def modules(self) -> nn.ModuleDict:
        """Every stateful module by kind, for checkpoints: models, adapters, loss terms."""
        out = nn.ModuleDict({
            "models": self.models,
            "adapters": nn.ModuleDict({k: a.module for k, a in self.adapters.items()}),
            "losses": nn.ModuleDict({k: s.module for k, s in self.losses.items()}),
        })
        # batch transforms with state (a replay buffer): the run's, then each stage's own
        transforms = {"run": self.batch_transform} if isinstance(self.batch_transform, nn.Module) else {}
        for plan in self.stages:
            t = plan.batch_transform
            if isinstance(t, nn.Module) and t is not self.batch_transform:
                transforms[f"stage_{plan.name}"] = t
        if any(getattr(t, "checkpointed", False) for t in transforms.values()):
            out["transforms"] = nn.ModuleDict(transforms)
        return out

    def has_class_head(self, name: str) -> bool:
        """Whether model ``name``'s output has one column per class, per sample or per position (a
        projection head has not: its top-1 is not measured; a linear probe judges its features)."""
        shape = self.shapes.get(f"{name}.logits")
        if shape is not None and len(shape) == 3 and self.cfg.data.eval_mask is not None:
            return True  # token scores: next-token prediction over the model's own vocabulary (padded rows included)
        return shape is not None and len(shape) >= 2 and shape[-1] == int(self.cfg.data.num_classes)

    def eval_fields(self, name: str) -> tuple[str | None, str]:
        """(mask field, target field) that model ``name``'s evaluation reads: its own ``eval_mask`` / ``eval_target``,
        else the data's."""
        mcfg = self.cfg.models.get(name) if hasattr(self.cfg, "models") else None
        d = self.cfg.data
        mask = getattr(mcfg, "eval_mask", None) or d.eval_mask
        return mask, getattr(mcfg, "eval_target", None) or d.eval_target

    @property
    def trained_models(self) -> list[str]:
        """Every model some stage trains, in order of first training."""
        return list(dict.fromkeys(m for plan in self.stages for m in plan.trained_models))
