"""One stage of a run: its optimizer groups, the training step, its epochs and steps.

The step (:meth:`StageRunner.train_step`), for each of the window's K micro-batches
(``trainer.accumulate_grad_batches``): batch transform (mixup, one-hot targets; a transform with
``per_step`` runs once over the whole window first, e.g. one batched rollout) -> frozen models
(eval mode, no autograd) -> trained models -> adapters -> loss terms, each scaled so that the window's
mean is a global mean (:mod:`kdrun.engine.accumulate`) -> ``total = sum(weight * term)`` -> backward
(with co-trained optimizer groups: one backward per group over its own terms, restricted to its
parameters; DDP all-reduces on the last micro-batch only); then every group's optimizer step.

Loss values are accumulated on the device and read every ``trainer.log_every`` optimizer steps (the
only host-device synchronisation in training besides evaluations and the end of an epoch). After
every epoch, and every ``trainer.eval_every_steps`` / ``save_every_steps`` steps: evaluation of the
stage's ``eval`` model, metrics, and the ``last`` (on improvement also ``best``) checkpoint; a
mid-epoch checkpoint resumes at the next micro-batch with the same data order and RNG.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import signal
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdrun.build import instantiate_node
from kdrun.component import Component, OuterStep, StageInfo, components
from kdrun.config import import_target
from kdrun.engine.accumulate import scaled, window_scales
from kdrun.engine.accelerate import autocast, deterministic_failure, fused_kwargs, grad_scaler, model_callables
from kdrun.engine.checkpoint import save_training_state
from kdrun.engine.distributed import DistInfo, all_reduce_max, all_reduce_sum
from kdrun.engine.evaluate import evaluate, evaluate_terms
from kdrun.engine.metrics import MetricsWriter
from kdrun.engine.statistics import fill_class_means
from kdrun.data.loaders import make_loader
from kdrun.engine.record import RunKey, RunRecord
from kdrun.devices import peak_memory_mb
from kdrun.errors import KdrunError
from kdrun.experiment import Experiment
from kdrun.models.frozen import set_trainable, trainable_parameters
from kdrun.names import gather, names_of
from kdrun.plan import GroupPlan

log = logging.getLogger("kdrun")


@dataclass
class RunContext:
    """What every stage of a run shares (made by :meth:`kdrun.engine.trainer.Trainer.prepare`)."""

    experiment: Experiment
    record: RunRecord
    writer: MetricsWriter
    run_dir: Path
    train_loader: Any
    test_loader: Any
    dist: DistInfo
    class_groups: dict[str, Tensor] | None = None  # many/medium/few-shot classes of a long-tailed set
    interrupts: Any = None  # kdrun.engine.interrupt.InterruptFlag while Trainer.fit runs
    wrapped: dict[tuple[Any, ...], tuple[DistributedDataParallel, Any]] = field(default_factory=dict)

    def data_parallel(self, name: str, unused: bool) -> tuple[DistributedDataParallel, Any]:
        """Model ``name`` wrapped in DistributedDataParallel, and what the step calls (the wrapper, compiled
        with ``trainer.compile``): made once per run for each set of trained parameters and
        ``find_unused_parameters``, so later stages and rounds reuse its buckets and compiled graphs
        instead of wrapping (broadcasting the weights) and compiling again.

        ``broadcast_buffers`` is off for a model with SyncBatchNorm layers (their running statistics come
        from the global batch, identical on every rank already) and on otherwise (rank 0's BatchNorm
        statistics, which the sharded evaluation then uses on every rank)."""
        exp, tcfg = self.experiment, self.experiment.cfg.trainer
        model = exp.models[name]
        key = (name, unused, tuple(n for n, p in model.named_parameters() if p.requires_grad))
        if key not in self.wrapped:
            device = exp.device
            ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
            synced = any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
            with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep rank-local buffers
                warnings.simplefilter("ignore", FutureWarning)
                ddp = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=not synced,
                                              find_unused_parameters=unused)
            call = model_callables(nn.ModuleDict({name: ddp}), tcfg.compile, tcfg.compile_mode, tcfg.compile_backend)[name]
            self.wrapped[key] = (ddp, call)
        return self.wrapped[key]


@dataclass
class OptimizerGroup:
    """A stage's optimizer group at run time: its parameters, loss terms, optimizer and scheduler."""

    name: str
    params: list[nn.Parameter]
    losses: tuple[str, ...]
    optimizer: torch.optim.Optimizer
    scheduler: Any


class EpochMeter:
    """Running sums of the logged values on the device: since the last log row, and over the epoch.
    Saved in mid-epoch checkpoints, so that a resumed epoch logs what the uninterrupted one would."""

    def __init__(self) -> None:
        self.keys: list[str] | None = None
        self.acc: Tensor | None = None  # since the last log row
        self.since = 0
        self.epoch_acc: Tensor | None = None
        self.steps = 0
        self.samples = 0
        self.tokens = 0  # token positions (padding included) of text batches: batch.input_ids sizes, known on the host
        self.seconds = 0.0
        self._weights: tuple[tuple[float, ...] | None, Tensor | None] = (None, None)
        self.first_bad: Tensor | None = None  # per key: the first run step whose value (or weighted value) was not finite

    def add(self, total: Tensor, values: Mapping[str, Tensor], samples: int, tokens: int = 0, step: int = 0,
            weights: Mapping[str, float] | None = None) -> None:
        """Add one step's values; ``step`` and the terms' ``weights`` feed the non-finite record, kept
        on the device (a term is non-finite when its value or its weighted value is)."""
        if self.keys is None:
            self.keys = ["total", *values]
        vec = torch.stack([total.float(), *(values[k].float() for k in self.keys[1:])])
        w = tuple([1.0] + [float((weights or {}).get(k.split(".", 1)[0], 1.0)) for k in self.keys[1:]])
        if w != self._weights[0]:  # a copy to the device only when the weights change (epoch ramps)
            self._weights = (w, torch.tensor(w, device=vec.device))
        bad = ~torch.isfinite(vec * self._weights[1])  # weights are finite and >= 0: non-finite values stay non-finite
        first = torch.full_like(vec, math.inf) if self.first_bad is None else self.first_bad
        self.first_bad = torch.where(bad & torch.isinf(first), float(step), first)  # a Python scalar: no copy
        self.acc = vec if self.acc is None else self.acc + vec
        self.epoch_acc = vec if self.epoch_acc is None else self.epoch_acc + vec
        self.since += 1
        self.steps += 1
        self.samples += samples
        self.tokens += tokens

    def take(self) -> Tensor:
        """The means since the last log row (then restart that count)."""
        assert self.acc is not None
        out, self.acc, self.since = self.acc / self.since, None, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("keys", "acc", "since", "epoch_acc", "steps", "samples", "tokens", "seconds",
                                              "first_bad")}

    def load_state_dict(self, state: Mapping[str, Any], device: torch.device) -> None:
        for k, v in state.items():
            setattr(self, k, v.to(device) if isinstance(v, Tensor) else v)


def _show_progress(setting: str) -> bool:
    return setting == "on" or (setting == "auto" and sys.stderr.isatty())


class StageRunner:
    """Trains one stage (``index`` of the experiment's stages, in round ``key.round``): owns its
    optimizer groups (the main one and any ``co_train`` ones), each with its optimizer and scheduler,
    and the grad scaler. ``base_weights`` replaces the terms' weights (self-distillation rounds)."""

    def __init__(self, ctx: RunContext, index: int, key: RunKey, base_weights: Mapping[str, float] | None = None) -> None:
        exp = ctx.experiment
        self.ctx, self.exp, self.index, self.key = ctx, exp, index, key
        self.plan = exp.stages[index]
        self.dist, self.record, self.device = ctx.dist, ctx.record, exp.device
        tcfg = exp.cfg.trainer
        self.accumulate = tcfg.accumulate_grad_batches
        self.epochs, self.total_steps = self._lengths(len(ctx.train_loader))
        self.base_weights = {t: exp.losses[t].weight for t in self.plan.losses} | dict(base_weights or {})
        if exp.sharded:  # the optimizers must hold the shards, not a unit's unsharded copies from the last forward
            from kdrun.engine.fsdp import reshard_all

            reshard_all(exp.models.values())
        self.groups = [self._make_group(g) for g in self.plan.groups]
        self.optimizer = self.groups[0].optimizer  # the main group's (its lr is the one logged as `lr`)
        # each group's parameters get the gradient of its own terms only, unless the stage shares them
        self.routed = len(self.groups) > 1 and not self.plan.cfg.share_gradients
        self.align = self.plan.cfg.align_gradients
        if self.align is not None and (ctx.dist.enabled or exp.sharded):
            raise KdrunError(f"stages.{self.plan.name}.align_gradients: per-term gradients are computed with "
                             f"torch.autograd.grad, which DDP/FSDP do not reduce; run it in one process")
        if self.key.label not in ctx.record.stages:  # the stage starts (a resumed run inside it has its weights)
            self._init_weights()
        self.set_modes()  # DDP wraps only modules whose parameters require grad
        self.forwards, self.ddp = self._forwards()
        self.compute_terms = self._compiled_step() or self.term_outputs
        precision = tcfg.precision  # read once: a config lookup per step costs microseconds
        self.autocast = lambda: autocast(exp.device, precision)
        self.scaler = grad_scaler(exp.device, precision)
        self.per_step_schedule = self.plan.cfg.scheduler_interval == "step"
        self.hooked = components({**{f"a.{a}": exp.adapters[a].module for a in self.plan.adapters},
                                  **{f"l.{t}": exp.losses[t].module for t in self.plan.losses},
                                  **({"transform": self.plan.batch_transform}
                                     if isinstance(self.plan.batch_transform, Component) else {})})
        if (isinstance(self.plan.batch_transform, Component) and exp.sharded and hasattr(self.plan.batch_transform, "bind")
                and not getattr(self.plan.batch_transform, "shard_safe", False)):
            raise KdrunError(f"stages.{self.plan.name}: {type(self.plan.batch_transform).__name__} runs a model inside the "
                             f"batch transform, which the FSDP-sharded path does not support; run it without trainer.fsdp")
        self.meter = EpochMeter()
        weighers = [c for c in self.hooked if callable(getattr(c, "domain_weights", None))]  # DDK: a domain-weighted sampler
        if weighers and not hasattr(ctx.train_loader, "domain_weights"):
            raise KdrunError(f"stages.{self.plan.name}: {type(weighers[0]).__name__} weighs the training domains, which "
                             f"works with token data sets (data.source.domains); {type(ctx.train_loader).__name__} has none")
        if hasattr(ctx.train_loader, "domain_weights"):
            ctx.train_loader.domain_weights = weighers[0].domain_weights if weighers else None
        self.outer = [c for c in self.hooked if c.wants_outer_step]
        self.batch_changers = [c for c in self.hooked if c.transforms_batch]
        self.meta_loader: Any = None
        needs = [c for c in self.outer if c.outer_step_needs_held_out]
        if needs and getattr(exp.data, "meta", None) is None:
            raise KdrunError(f"stages.{self.plan.name}: {type(needs[0]).__name__} learns on a held-out meta set; set "
                             f"data.meta_split=N (N training examples held out, e.g. 5000 of CIFAR's 50,000)")
        if self.outer and exp.sharded:
            raise KdrunError(f"stages.{self.plan.name}: outer steps run the student functionally, which FSDP does not support")
        fill_class_means(exp, {t: exp.losses[t].module for t in self.plan.losses if isinstance(exp.losses[t].module, Component)},
                         self.dist, ctx.run_dir, self.autocast, self.plan.eval_transform)
        info = self.info()
        for c in self.hooked:  # the stage starts (or a resumed run re-enters it)
            c.on_stage_start(info)

    # ------------------------------------------------------------------------------ setup
    @torch.no_grad()
    def _init_weights(self) -> None:
        """``init_weights: {model: source}``: copy into ``model`` every tensor of ``source`` with the same
        name (the builder checked their shapes), in place: optimizers and wrappers keep their references."""
        for dst, src in self.plan.cfg.init_weights.items():
            target, source = self.exp.models[dst].state_dict(), self.exp.models[src].state_dict()
            same = [k for k in target if k in source]
            for k in same:
                target[k].copy_(source[k])
            kept = [k for k in target if k not in source]
            log.info("[%s] %s starts from %s: %d of its %d tensors copied%s", self.key.label, dst, src, len(same),
                     len(target), f"; kept at initialisation: {', '.join(kept[:8])}{' ...' if len(kept) > 8 else ''}"
                     if kept else "")

    def _lengths(self, batches_per_epoch: int) -> tuple[int, int]:
        """(epochs, optimizer steps) of the stage, from ``epochs``, ``max_steps`` and the trainer's caps."""
        cap = self.exp.cfg.trainer.max_epochs
        per_epoch = math.ceil(batches_per_epoch / self.accumulate)
        if per_epoch < 1:
            raise KdrunError(f"stages.{self.plan.name}: the training set gives no batch (data.batch_size larger than "
                             f"the set with drop_last?)")
        epochs = self.plan.epochs if self.plan.epochs is not None else math.ceil(self.plan.max_steps / per_epoch)
        epochs = min(epochs, cap) if cap else epochs
        steps = epochs * per_epoch if self.plan.max_steps is None else min(self.plan.max_steps, epochs * per_epoch)
        return math.ceil(steps / per_epoch), steps

    def _make_group(self, group: GroupPlan) -> OptimizerGroup:
        exp = self.exp
        modules = [exp.adapters[a].module for a in group.adapters if exp.adapters[a].trainable]
        modules += [exp.losses[t].module for t in group.losses]
        params = [p for m in group.models for p in trainable_parameters(exp.models[m])]
        params += [p for m in modules for p in (m.stage_parameters() if isinstance(m, Component) else m.parameters())]
        if not params:
            raise KdrunError(f"{group.key}: nothing to train (its models, adapters and loss terms have no parameters)")
        target = import_target(group.optimizer["_target_"], f"{group.key}.optimizer")
        extra = fused_kwargs(target, exp.device, exp.cfg.trainer.fused_optimizer, exp.cfg.trainer.precision)
        if exp.device.type == "cuda" and exp.cfg.trainer.precision == "fp16" and not extra:
            log.info("%s: %s has no fused implementation: under fp16 each step reads the gradient scaler's overflow "
                     "flag on the host (one synchronisation per step)", group.key, group.optimizer["_target_"])
        optimizer = instantiate_node(group.optimizer, params, **extra)
        scheduler = None
        if group.scheduler is not None:
            target = import_target(group.scheduler["_target_"], f"{group.key}.scheduler")
            length = self.total_steps if self.plan.cfg.scheduler_interval == "step" else self.epochs
            arguments = inspect.signature(target).parameters
            for k, v in group.scheduler.items():
                if v is None and k in arguments and arguments[k].default is inspect.Parameter.empty and k != "total_steps":
                    raise KdrunError(f"{group.key}.scheduler.{k} is null (e.g. T_max=${{..epochs}} in a stage without epochs): "
                                     f"set it, or use sched@{group.key}.scheduler=warmup_cosine with scheduler_interval=step")
            wants = "total_steps" in arguments and group.scheduler.get("total_steps") is None
            scheduler = instantiate_node(group.scheduler, optimizer, drop={"total_steps"} if wants else set(),
                                         **({"total_steps": length} if wants else {}))
        return OptimizerGroup(group.name, params, group.losses, optimizer, scheduler)

    def _forwards(self) -> tuple[dict[str, Any], list[DistributedDataParallel]]:
        """What the step calls: models as prepared by the trainer; under DDP, the stage's trained models
        wrapped in DistributedDataParallel (then compiled), made once per run for each model and set of
        trained parameters and reused by later stages and rounds (:meth:`RunContext.data_parallel`).
        Trainable adapters and loss terms are called as they are: their gradients are averaged over
        the ranks by one coalesced all-reduce per optimizer step (:meth:`_average_module_gradients`)."""
        exp, plan = self.exp, self.plan
        calls: dict[str, Any] = dict(exp.forwards)
        calls.update({f"adapters.{a}": exp.adapters[a].module for a in plan.adapters})
        calls.update({f"loss.{t}": exp.losses[t].module for t in plan.losses})
        modules = [exp.adapters[a].module for a in plan.adapters if exp.adapters[a].trainable]
        modules += [exp.losses[t].module for t in plan.losses]
        self.module_params = [p for m in modules for p in m.parameters() if p.requires_grad]
        if not self.dist.enabled:
            return calls, []
        if self.module_params:  # identical on every rank from the start (as DDP's wrapping did)
            for p in self.module_params:
                torch.distributed.broadcast(p.data, src=0)
        reads = {n for t in plan.losses for n in names_of(exp.losses[t].inputs)}
        wrapped: list[DistributedDataParallel] = []
        for name in plan.trained_models:
            if exp.sharded:  # FSDP reduce-scatters the sharded model's gradients itself
                continue
            # a stage that never reads a model's logits leaves its head without gradient (AB/FT init stages)
            ddp, calls[name] = self.ctx.data_parallel(name, unused=f"{name}.logits" not in reads)
            wrapped.append(ddp)
        return calls, wrapped

    def _compiled_step(self) -> Any:
        """With ``trainer.compile=true trainer.compile_scope=step``: :meth:`term_outputs` (every model,
        adapter and loss term of the micro-batch) compiled as one function, static shapes, one per stage
        (where torch cannot trace, e.g. a term's own random generator, it breaks the graph and goes on).
        Under DDP or FSDP the models are compiled one by one instead (the ``models`` scope)."""
        tcfg = self.exp.cfg.trainer
        if not (tcfg.compile and tcfg.compile_scope == "step"):
            return None
        if self.dist.enabled or self.exp.sharded:
            if self.index == 0 and self.dist.is_main:
                log.info("trainer.compile_scope=step: under data parallelism each model is compiled on its own "
                         "(the models scope)")
            return None
        mode = None if tcfg.compile_mode == "default" else tcfg.compile_mode
        return torch.compile(self.term_outputs, mode=mode, backend=tcfg.compile_backend, dynamic=False)

    def _average_module_gradients(self) -> None:
        """Under DDP: the mean over ranks of the gradients of the stage's trainable adapters and loss
        terms, in one all-reduce per dtype (they are small; the models' own gradients are reduced by
        DDP during the backward). Every rank must produce gradients for the same parameters, which
        kdrun's terms do (the same code path on every rank)."""
        if not self.dist.enabled or not self.module_params:
            return
        grads = [p.grad for p in self.module_params if p.grad is not None]
        if not grads:
            return
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for group in by_dtype.values():
            flat = _flatten_dense_tensors(group)
            torch.distributed.all_reduce(flat)
            flat.div_(self.dist.world_size)
            for g, mean in zip(group, _unflatten_dense_tensors(flat, group)):
                g.copy_(mean)

    def set_modes(self) -> None:
        """Trained models, trainable adapters and loss terms in train mode with gradients; every other
        model and adapter frozen in eval mode (a stage that trains no model keeps them all frozen)."""
        exp, plan = self.exp, self.plan
        for name, model in exp.models.items():
            trains = name in plan.trained_models
            model.train(trains)
            set_trainable(model, trains)
        for name, spec in exp.adapters.items():
            trains = name in plan.adapters and spec.trainable
            spec.module.train(trains)
            spec.module.requires_grad_(trains)
        for spec in exp.losses.values():
            spec.module.train(True)

    def info(self) -> StageInfo:
        plan = self.plan
        return StageInfo(plan.name, self.index, self.key.round, tuple(plan.trained_models), tuple(plan.frozen_models),
                         self.epochs, plan.max_steps)

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Every optimizer group's optimizer and scheduler state, the grad scaler's, and the epoch's
        running sums (a mid-epoch checkpoint)."""
        return {"groups": {g.name: {"optimizer": g.optimizer.state_dict(),
                                    "scheduler": g.scheduler.state_dict() if g.scheduler else None}
                           for g in self.groups},
                "scaler": self.scaler.state_dict(), "meter": self.meter.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        groups = state.get("groups") or {"main": {"optimizer": state["optimizer"], "scheduler": state.get("scheduler")}}
        if set(groups) != {g.name for g in self.groups}:
            raise KdrunError(f"resume: the checkpoint's stage '{self.plan.name}' has optimizer groups {sorted(groups)}, "
                             f"this config has {sorted(g.name for g in self.groups)}")
        for g in self.groups:
            opt_state = groups[g.name]["optimizer"]
            if self.exp.sharded:
                from kdrun.engine.fsdp import shard_optimizer_state

                opt_state = shard_optimizer_state(g.optimizer, opt_state)
            g.optimizer.load_state_dict(opt_state)
            if g.scheduler is not None and groups[g.name].get("scheduler") is not None:
                g.scheduler.load_state_dict(groups[g.name]["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("meter") and self.record.batch > 0:  # a mid-epoch checkpoint: the epoch's sums so far
            self.meter.load_state_dict(state["meter"], self.device)

    def check_finite(self, parameters: bool = False) -> None:
        """Stop with the name of the loss term that first became non-finite (its value or its weighted
        value), before anything is written; with ``parameters``, also when a trained parameter is not
        finite (an update that overflowed). Reads the device-side record: call it only where the engine
        synchronises anyway (log rows, evaluations, checkpoints)."""
        meter, dist = self.meter, self.dist
        if meter.first_bad is not None:
            first = meter.first_bad.clone()
            if dist.enabled:  # every rank stops together, on the earliest failure of any rank
                first = -all_reduce_max(-first, dist)
            steps = first.tolist()
            bad = [(s, k) for s, k in zip(steps, meter.keys or []) if math.isfinite(s)]
            if bad:
                step = int(min(s for s, _ in bad))
                terms = [k for s, k in bad if s == step and k != "total"]
                all_terms = [k for k in (meter.keys or [])[1:] if "." not in k]
                where = (f"in stage '{self.plan.name}' at step {step - (self.record.step - self.record.stage_step)} "
                         f"(run step {step})")
                if not terms:
                    raise KdrunError(f"the weighted total loss became non-finite {where} while every term was finite: "
                                     f"a weight overflows float32; lower the terms' weights. No checkpoint was written "
                                     f"from that step on.")
                if len(all_terms) > 1 and set(all_terms) <= set(terms):
                    raise KdrunError(f"every loss term ({', '.join(all_terms)}) became non-finite at once {where}: the "
                                     f"weights went non-finite in the update before it (learning rate too large?). "
                                     f"No checkpoint was written from that step on.")
                name = terms[0].split(".", 1)[0]
                weight = self.exp.losses[name].weight if name in self.exp.losses else None
                raise KdrunError(f"loss term '{terms[0]}' (weight {weight:g}) became non-finite {where}; lower the learning "
                                 f"rate or the term's weight, or check its inputs. No checkpoint was written from that "
                                 f"step on.")
        if parameters:
            for g in self.groups:
                local = [getattr(p, "to_local", lambda p=p: p)() for p in g.params]  # FSDP: this rank's shards
                ok = torch.stack([torch.isfinite(p).all() for p in local]).all()
                if dist.enabled:
                    ok = all_reduce_max((~ok).float().reshape(1), dist)[0] == 0
                if not bool(ok):
                    raise KdrunError(f"the parameters trained by {g.name if g.name != 'main' else 'stage'} '{self.plan.name}' "
                                     f"became non-finite by step {self.record.step} (learning rate too large?); no "
                                     f"checkpoint was written over the last good one")

    def save(self, best: bool = False) -> None:
        self.check_finite(parameters=True)
        save_training_state(self.exp, self.record, self.state_dict(), self.ctx.run_dir, best, self.dist, self.ctx.writer.rows)

    # ------------------------------------------------------------------------------ the step
    def term_weights(self, epoch: int) -> dict[str, float]:
        """Each term's weight in ``epoch`` (0-based): its (round's) weight, ramped up over ``warmup_epochs``."""
        out = {}
        for name in self.plan.losses:
            spec = self.exp.losses[name]
            ramp = min(1.0, (epoch + spec.warmup_offset) / spec.warmup_epochs) if spec.warmup_epochs > 0 else 1.0
            out[name] = self.base_weights[name] * ramp
        return out

    def forward(self, batch: Mapping[str, Tensor], weights: Mapping[str, float], scales: Mapping[str, Any] | None = None
                ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """One micro-batch: the weighted total, the detached term values, and every weighted term
        (``scales``: each term's share of the window's global mean, see :mod:`kdrun.engine.accumulate`;
        None: the values as they are). The models, adapters and terms run in :meth:`term_outputs`
        (compiled as one function with ``trainer.compile_scope=step``); weights and scales are applied
        here, outside it, so that their changing values never recompile it."""
        scales = scales or {}
        outputs = self.compute_terms(batch)
        total = torch.zeros((), device=self.device)
        values: dict[str, Tensor] = {}
        weighted: dict[str, Tensor] = {}
        for name in self.plan.losses:
            out = scaled(outputs[name], scales.get(name))
            if isinstance(out, dict):
                for part, v in out.items():
                    values[f"{name}.{part}"] = v.detach()
                out = torch.stack([v.float() for v in out.values()]).sum()
            values[name] = out.detach()
            weighted[name] = weights[name] * out
            total = total + weighted[name]
        return total, values, weighted

    # ------------------------------------------------------------------------------ outer steps
    def _outer_steps(self, batch: Mapping[str, Tensor]) -> None:
        """Every bilevel component's outer step (:class:`kdrun.component.OuterStep`) before the step."""
        held_out = self._meta_batch() if any(c.outer_step_needs_held_out for c in self.outer) else {}
        step = OuterStep(batch=batch, held_out=held_out, forward=self.functional_forward, lr=self._lr_of,
                         reduce_mean=self._reduce_mean, params=self._trained_params, step=self.record.stage_step)
        with self.autocast():
            for c in self.outer:
                c.outer_step(step)

    def _meta_batch(self) -> dict[str, Tensor]:
        """The next batch of the meta set, shuffled and augmented as training batches are, in a seeded order
        per pass (a function of the stage's step, so a resumed run draws what an uninterrupted one would),
        sharded per rank."""
        if self.meta_loader is None:
            d = self.exp.cfg.data
            self.meta_loader = make_loader(self.exp.data.meta, "train", d, self.device, train=True, seed=self.exp.cfg.seed,
                                           rank=self.dist.rank, world_size=self.dist.world_size,
                                           batch_size=min(d.batch_size, self.exp.data.meta.num_train),
                                           channels_last=self.exp.cfg.trainer.channels_last)
            self.meta_pass, self.meta_iter = -1, None
        n = len(self.meta_loader)
        pass_, pos = divmod(self.record.stage_step, n)
        if pass_ != self.meta_pass or self.meta_iter is None:
            self.meta_loader.set_epoch(self.epoch_key(10_000 + pass_), start=pos)
            self.meta_pass, self.meta_iter = pass_, iter(self.meta_loader)
        batch = next(self.meta_iter)
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}

    def functional_forward(self, batch: Mapping[str, Tensor], models: Sequence[str],
                           params: Mapping[str, Mapping[str, Tensor]] | None = None) -> dict[str, Any]:
        """The named tensors of ``models`` on ``batch`` (see :class:`kdrun.component.OuterStep`)."""
        from torch.func import functional_call

        exp, params = self.exp, params or {}
        ns: dict[str, Any] = {f"batch.{k}": v for k, v in batch.items()}
        for name in models:
            model = exp.models[name]
            if name in params:
                state = {**{k: b.clone() for k, b in model.named_buffers()}, **params[name]}
                exp.io[name].run(lambda *a, m=model, st=state, **kw: functional_call(m, st, a, kw, strict=False), batch, ns)
            else:
                with torch.no_grad():
                    exp.io[name].run(model, batch, ns)
        return ns

    def _trained_params(self, model: str) -> dict[str, nn.Parameter]:
        return {k: p for k, p in self.exp.models[model].named_parameters() if p.requires_grad}

    def _lr_of(self, model: str) -> float:
        for group, g in zip(self.plan.groups, self.groups):
            if model in group.models:
                return float(g.optimizer.param_groups[0]["lr"])
        raise KdrunError(f"stage '{self.plan.name}': no optimizer group trains '{model}' (an outer step asked for its lr)")

    def _reduce_mean(self, tensors: Sequence[Tensor]) -> None:
        if self.dist.enabled:
            for t in tensors:
                torch.distributed.all_reduce(t)
                t.div_(self.dist.world_size)

    def term_outputs(self, batch: Mapping[str, Tensor]) -> dict[str, Any]:
        """Frozen models (no autograd), trained models, adapters, then every loss term's raw output."""
        exp, plan, call = self.exp, self.plan, self.forwards
        ns: dict[str, Any] = {f"batch.{k}": v for k, v in batch.items()}
        with torch.no_grad():
            for name in plan.frozen_models:
                exp.io[name].run(call[name], batch, ns)
        for name in plan.trained_models:
            exp.io[name].run(call[name], batch, ns)
        for name in plan.adapters:
            ns[f"adapters.{name}"] = call[f"adapters.{name}"](**gather(ns, exp.adapters[name].inputs))
        return {name: call[f"loss.{name}"](**gather(ns, exp.losses[name].inputs)) for name in plan.losses}

    def train_step(self, batches: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]], weights: Mapping[str, float],
                   rank_sizes: Sequence[Sequence[int]] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimizer step of every group over a window of micro-batches (or one batch).

        With several optimizer groups (``co_train``) and routing on, group g's parameters receive
        ``d(sum of g's weighted terms)/d(theta_g)`` only: one backward per group, restricted to the
        group's parameters (``inputs=``), so a student's loss never reaches a co-trained teacher (and
        the reverse). Returns the window's weighted total and term values (global means)."""
        try:
            return self._train_step(batches, weights, rank_sizes)
        except RuntimeError as ex:
            failure = deterministic_failure(ex, f"stage '{self.plan.name}' (loss terms {', '.join(self.plan.losses)})")
            if failure is not None:
                raise failure from None
            raise

    def _train_step(self, batches: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]], weights: Mapping[str, float],
                    rank_sizes: Sequence[Sequence[int]] | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The step itself (see :meth:`train_step`)."""
        window = [batches] if isinstance(batches, Mapping) else list(batches)
        sizes = rank_sizes or [[int(b["index"].shape[0])] * self.dist.world_size for b in window]
        for g in self.groups:
            g.optimizer.zero_grad(set_to_none=True)
        total: Tensor | None = None
        values: dict[str, Tensor] = {}
        first: Mapping[str, Tensor] | None = None
        transform = self.plan.batch_transform
        # a transform of the whole step (one batched rollout for all micro-batches) runs once, before anything else
        stepwise = transform is not None and getattr(transform, "per_step", False)
        announced = stepwise or bool(self.outer)  # micro-batch 0 is announced to the hooks before the loop below
        if announced:
            for c in self.hooked:
                c.on_batch(tuple(sizes[0]), self.dist.rank)
        if stepwise:
            window = transform.window(window)
            transform = None
        if self.outer:  # bilevel components update their own parameters first, on the step's first micro-batch
            first = window[0] if transform is None else transform(window[0])
            self._outer_steps(first)

        def prepare(k: int) -> Mapping[str, Tensor]:
            """Micro-batch k as the models see it: the stage's transform, then components' own changes."""
            if k > 0 or not announced:
                for c in self.hooked:
                    c.on_batch(tuple(sizes[k]), self.dist.rank)
            batch = first if k == 0 and first is not None else window[k]
            if not (k == 0 and first is not None) and transform is not None:
                batch = transform(batch)
            for c in self.batch_changers:  # components' own changes of the training batch (HARD's learned augmentation)
                batch = c.transform_batch(batch)
            return batch

        # token means count the tokens the terms see, which a transform may change (a rollout does): then every
        # micro-batch is transformed before the scales are computed; otherwise one at a time (less memory held)
        changes = self.plan.batch_transform is not None or bool(self.batch_changers)
        eager = changes and any(self.exp.losses[t].mean_over == "tokens" for t in self.plan.losses)
        seen: list[Mapping[str, Tensor] | None] = [None] * len(window)
        if eager:
            for k in range(len(window)):
                seen[k] = prepare(k)
                window[k] = None  # type: ignore[call-overload]  # the raw batch is no longer needed
        scales = window_scales(seen if eager else window, sizes, self.exp.losses, self.plan.losses, self.dist)
        for k in range(len(window)):
            if eager:
                batch = seen[k]
                seen[k] = None
                if len(window) > 1:  # the layout of the micro-batch the terms now see (memory banks read it)
                    for c in self.hooked:
                        c.on_batch(tuple(sizes[k]), self.dist.rank)
            else:
                batch = prepare(k)
            with self._no_sync(k < len(window) - 1):
                with self.autocast():
                    t, v, weighted = self.forward(batch, weights, scales[k])
                self._backward(t, weighted)
            total = t.detach() if total is None else total + t.detach()
            values = v if not values else {name: values[name] + x for name, x in v.items()}
        self._average_module_gradients()
        clip = self.exp.cfg.trainer.gradient_clip_norm
        for g in self.groups:
            if clip is not None:  # on the device: the norm is never read on the host
                self.scaler.unscale_(g.optimizer)
                torch.nn.utils.clip_grad_norm_([p for p in g.params if p.grad is not None], clip, foreach=True)
            self.scaler.step(g.optimizer)
        self.scaler.update()
        if self.per_step_schedule:
            for g in self.groups:
                if g.scheduler is not None:
                    g.scheduler.step()
        assert total is not None
        return total, values

    def _backward(self, total: Tensor, weighted: Mapping[str, Tensor]) -> None:
        if self.align is not None:
            self._aligned_backward(weighted)
            return
        if not self.routed:
            self.scaler.scale(total).backward()
            return
        last = len(self.groups) - 1
        for i, g in enumerate(self.groups):
            objective = torch.stack([weighted[t].float() for t in g.losses]).sum()
            self.scaler.scale(objective).backward(inputs=g.params, retain_graph=i < last)

    def _aligned_backward(self, weighted: Mapping[str, Tensor]) -> None:
        """Gradient alignment (``align_gradients: REF``): one backward per term over the group's parameters,
        as one flattened vector each; a term whose gradient g has ``g . g_REF < 0`` contributes
        ``g - (g . g_REF / ||g_REF||^2) g_REF`` instead (PCGrad's projection, Yu et al., NeurIPS 2020, against one
        reference). The sum is added to ``.grad`` (per micro-batch under accumulation). Device arithmetic only."""
        params = [p for p in self.groups[0].params if p.requires_grad]
        names = list(self.plan.losses)
        grads: dict[str, list[Tensor]] = {}
        for i, t in enumerate(names):
            gs = torch.autograd.grad(self.scaler.scale(weighted[t].float()), params, retain_graph=i < len(names) - 1,
                                     allow_unused=True)
            grads[t] = [g if g is not None else torch.zeros_like(p) for g, p in zip(gs, params)]
        ref = grads[self.align]
        ref_sq = torch.stack([(r.float() * r.float()).sum() for r in ref]).sum()
        total = [r.clone() for r in ref]
        for t in names:
            if t == self.align:
                continue
            dot = torch.stack([(g.float() * r.float()).sum() for g, r in zip(grads[t], ref)]).sum()
            coef = torch.where(dot < 0, dot / ref_sq.clamp_min(1e-30), torch.zeros_like(dot))
            torch._foreach_add_(total, grads[t])
            torch._foreach_add_(total, [(-coef * r.float()).to(r.dtype) for r in ref])
        for p, g in zip(params, total):
            p.grad = g if p.grad is None else p.grad + g

    def _no_sync(self, skip: bool) -> contextlib.AbstractContextManager:
        """Under DDP, no gradient all-reduce for the window's micro-batches before the last one (under
        FSDP, no reduce-scatter of the sharded models' gradients)."""
        if self.exp.sharded:
            from kdrun.engine.fsdp import set_gradient_sync

            set_gradient_sync([self.exp.models[m] for m in self.plan.trained_models], not skip)
        if not skip or not self.ddp:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for module in self.ddp:
            stack.enter_context(module.no_sync())
        return stack

    # ------------------------------------------------------------------------------ the stage
    def run(self) -> None:
        """Train the stage from where the record stands to its last epoch or step."""
        exp, plan, record = self.exp, self.plan, self.record
        self._measure_frozen()
        if record.epoch == 0 and record.batch == 0 and plan.eval_model is not None and not exp.has_class_head(plan.eval_model):
            log.info("[%s] %s's output %s has no column per class (%d): its top-1 is not measured%s", self.key.label,
                     plan.eval_model, exp.shapes.get(f"{plan.eval_model}.logits"), exp.cfg.data.num_classes,
                     "; the linear probe judges its features" if exp.cfg.probe is not None else "")
        record.stages.setdefault(self.key.label, {
            "eval_model": plan.eval_model, "epochs": self.epochs, "steps": self.total_steps, "best_top1": None,
            "best_top5": None, "best_epoch": None, "best_step": None, "last_top1": None, "last_top5": None,
        })
        for epoch in range(record.epoch, self.epochs):
            if record.stage_step >= self.total_steps:
                break
            self.set_modes()
            for c in self.hooked:
                c.on_epoch_start(epoch, self.epochs)
            self._end_epoch(epoch, self.train_epoch(epoch))
            if epoch + 1 < self.epochs and self._interrupted(flushed=True):
                self._stop(epoch)

    def epoch_key(self, epoch: int) -> int:
        """The loader's key of ``epoch``: a new order per round, stage and epoch."""
        return (self.key.round * 1009 + self.index) * 100_003 + epoch

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One epoch's optimizer steps (from the record's position on); returns the epoch's means."""
        loader, record, tcfg = self.ctx.train_loader, self.record, self.exp.cfg.trainer
        if record.batch == 0:
            self.meter = EpochMeter()
        loader.set_epoch(self.epoch_key(epoch), start=record.batch)
        weights = self.term_weights(epoch)
        log_every, last = tcfg.log_every, len(loader) - 1
        bar = tqdm(total=len(loader), initial=record.batch, desc=f"{self.plan.name} {epoch + 1}/{self.epochs}",
                   leave=False, disable=not _show_progress(tcfg.progress), dynamic_ncols=True)
        window: list[dict[str, Tensor]] = []
        t0 = time.perf_counter()
        for i, batch in enumerate(loader, start=record.batch):
            window.append(batch)
            if len(window) < self.accumulate and i < last:
                continue
            for c in self.hooked:
                c.on_step(record.stage_step, self.total_steps)
            total, values = self.train_step(window, weights, [loader.rank_sizes(j) for j in range(i + 1 - len(window), i + 1)])
            record.step, record.stage_step, record.batch = record.step + 1, record.stage_step + 1, i + 1
            self.meter.add(total.detach(), values, sum(int(b["index"].shape[0]) for b in window),
                           sum(b["input_ids"].numel() for b in window if "input_ids" in b), record.step, weights)
            window = []
            bar.update(self.accumulate)
            if self.meter.since == log_every:
                bar.set_postfix(loss=f"{self._flush(epoch)['loss/total']:.4f}")
            if i == last or record.stage_step >= self.total_steps:
                break
            self.meter.seconds += time.perf_counter() - t0
            t0 = time.perf_counter()
            self._mid_epoch(epoch)
            if self._interrupted(flushed=self.meter.since == 0):
                bar.close()
                self._stop(epoch)
        bar.close()
        if self.meter.keys is None:
            raise KdrunError(f"stages.{self.plan.name}: the training set gave no batch (data.batch_size larger than the set with drop_last?)")
        if self.meter.since:
            self._flush(epoch)
        self.meter.seconds += time.perf_counter() - t0
        record.batch = 0  # the epoch is complete: no partial position
        return self._epoch_means()

    def _interrupted(self, flushed: bool) -> bool:
        """Whether a stop signal arrived: this process's flag alone, or under DDP every rank's, agreed at
        the log rows (``flushed``), where the ranks synchronise anyway."""
        flag = self.ctx.interrupts
        if flag is None:
            return False
        if not self.dist.enabled:
            return flag.pending
        if not flushed:
            return False
        agreed = all_reduce_max(torch.tensor([1.0 if flag.pending else 0.0], device=self.device), self.dist).item() > 0
        if agreed and flag.signum is None:
            flag.signum = signal.SIGTERM  # another rank was signalled
        return agreed

    def _stop(self, epoch: int) -> None:
        """After a stop signal: flush the log, write a mid-epoch checkpoint, raise RunInterrupted."""
        from kdrun.engine.interrupt import RunInterrupted

        if self.meter.since:
            self._flush(epoch)
        saved = self.exp.cfg.trainer.save_checkpoints
        if saved:
            self.save()
        where = (f"in stage '{self.plan.name}' epoch {epoch + 1}/{self.epochs}, after step {self.record.stage_step} of "
                 f"{self.total_steps} (run step {self.record.step})")
        raise RunInterrupted(int(self.ctx.interrupts.signum), where,
                             str(self.ctx.run_dir / "checkpoints" / "last.pt") if saved else None)

    def _epoch_means(self) -> dict[str, Any]:
        meter, dist = self.meter, self.dist
        assert meter.keys is not None and meter.epoch_acc is not None
        epoch_acc = all_reduce_sum(meter.epoch_acc.clone(), dist) / dist.world_size
        out: dict[str, Any] = {f"loss/{k}": v for k, v in zip(meter.keys, (epoch_acc / meter.steps).tolist())}
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        for g in self.groups[1:]:
            out[f"lr/{g.name}"] = g.optimizer.param_groups[0]["lr"]
        out["_samples"] = meter.samples * dist.world_size
        out["_tokens"] = meter.tokens * dist.world_size
        return out

    def _flush(self, epoch: int) -> dict[str, float]:
        means = self.meter.take()
        if self.dist.enabled:  # every rank sees the same means, so every rank stops on a non-finite one
            means = all_reduce_sum(means.clone(), self.dist) / self.dist.world_size
        self.check_finite()
        keys, values = self.meter.keys or [], means.tolist()
        row = {f"loss/{k}": v for k, v in zip(keys, values)}
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        self.ctx.writer.write({"stage": self.plan.name, "epoch": epoch + 1, "step": self.record.step, **row},
                              self.record.step, tb_prefix=f"{self.plan.name}/train/")
        return row

    def _mid_epoch(self, epoch: int) -> None:
        """Evaluation and checkpoint every ``eval_every_steps`` / ``save_every_steps`` optimizer steps."""
        tcfg, step = self.exp.cfg.trainer, self.record.stage_step
        improved = False
        if tcfg.eval_every_steps and step % tcfg.eval_every_steps == 0:
            row: dict[str, Any] = {"stage": self.plan.name, "epoch": epoch + 1, "step": self.record.step}
            improved = self._evaluate(row, epoch)
            self.ctx.writer.write(self._with_round(row), self.record.step, tb_prefix=f"{self.key.label}/")
            self.set_modes()
        if (tcfg.save_every_steps and step % tcfg.save_every_steps == 0) or improved:
            self.save(best=improved)

    def _end_epoch(self, epoch: int, means: dict[str, Any]) -> None:
        """After an epoch (or the stage's last step): schedule, evaluation, metrics row, checkpoint."""
        exp, record, tcfg = self.exp, self.record, self.exp.cfg.trainer
        if exp.device.type == "cuda":
            torch.cuda.synchronize(exp.device)
        seconds = self.meter.seconds
        record.train_time_s += seconds
        if not self.per_step_schedule:
            for g in self.groups:
                if g.scheduler is not None:
                    g.scheduler.step()
        record.epoch = epoch + 1
        last = epoch + 1 == self.epochs or record.stage_step >= self.total_steps
        samples, tokens = means.pop("_samples"), means.pop("_tokens")
        row: dict[str, Any] = {"stage": self.plan.name, "epoch": epoch + 1, "step": record.step, **means,
                               "epoch_time_s": seconds, "images_per_s": samples / max(seconds, 1e-9)}
        if tokens:
            row["tokens_per_s"] = tokens / max(seconds, 1e-9)
        row["peak_memory_mb"] = peak_memory_mb(exp.device)
        improved = False
        if (epoch + 1) % tcfg.eval_every == 0 or last:
            improved = self._evaluate(row, epoch)
        self.ctx.writer.write(self._with_round(row), record.step, tb_prefix=f"{self.key.label}/")
        stats = record.stages[self.key.label]
        if "ppl" in row:
            score = f"{self.plan.eval_model} perplexity {row['ppl']:.2f} (best {stats['best_ppl']:.2f}) "
        else:
            score = f"{self.plan.eval_model} top-1 {row['top1']:.2f} (best {stats['best_top1']:.2f}) " if "top1" in row else ""
        speed = f"{row['tokens_per_s']:.0f} tokens/s" if tokens else f"{row['images_per_s']:.0f} samples/s"
        log.info("[%s] epoch %d/%d  loss %.4f  %s %s  %.1fs", self.key.label, epoch + 1, self.epochs,
                 row.get("loss/total", float("nan")), score, speed, seconds)
        if improved or last or (epoch + 1) % tcfg.save_every == 0:
            self.save(best=improved)

    def _with_round(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "round": self.key.round + 1} if self.key.with_rounds else row

    def _evaluate(self, row: dict[str, Any], epoch: int) -> bool:
        """Evaluate the stage's eval model and its co-trained models into ``row`` and the stage's
        stats; return whether the eval model's top-1 improved."""
        exp, plan, ctx = self.exp, self.plan, self.ctx
        stats = self.record.stages[self.key.label]
        improved = False
        if plan.eval_model is not None and exp.has_class_head(plan.eval_model):
            mask, target = exp.eval_fields(plan.eval_model)
            with self.autocast():
                ev = evaluate(exp.models[plan.eval_model], ctx.test_loader, self.dist, ctx.class_groups, exp.io[plan.eval_model],
                              mask, self.plan.eval_transform, target)
            if not math.isfinite(ev["loss"]):
                raise KdrunError(f"evaluating {plan.eval_model} in stage '{plan.name}' after step {self.record.step}: the "
                                 f"test loss is {ev['loss']} (non-finite outputs: the weights diverged?); no checkpoint "
                                 f"was written over the last good one. Lower the learning rate or the terms' weights.")
            row.update({"top1": ev["top1"], "top5": ev["top5"], "test_loss": ev["loss"], "ece": ev["ece"]})
            stats["last_ece"] = ev["ece"]
            if "ppl" in ev:  # a language model: lower perplexity is better, and decides the best checkpoint
                row["ppl"] = ev["ppl"]
                stats["last_ppl"] = ev["ppl"]
                if stats.get("best_ppl") is None or ev["ppl"] < stats["best_ppl"]:
                    stats.update(best_ppl=ev["ppl"], best_ppl_step=self.record.stage_step)
                    improved = True
                row["best_ppl"] = stats["best_ppl"]
            row.update({f"top1_{g}": v for g, v in ev.get("group_top1", {}).items()})
            stats["last_top1"], stats["last_top5"] = ev["top1"], ev["top5"]
            if "group_top1" in ev:
                stats["last_shot_top1"] = ev["group_top1"]
            if stats["best_top1"] is None or ev["top1"] > stats["best_top1"]:
                stats.update(best_top1=ev["top1"], best_top5=ev["top5"], best_epoch=epoch + 1, best_step=self.record.stage_step)
                if "group_top1" in ev:
                    stats["best_shot_top1"] = ev["group_top1"]
                improved = improved or "ppl" not in ev
            row["best_top1"] = stats["best_top1"]
        for name in plan.trained_models:  # co-trained models (DML peers, online teachers)
            if name == plan.eval_model or not exp.has_class_head(name):
                continue
            mask, target = exp.eval_fields(name)
            with self.autocast():
                other = evaluate(exp.models[name], ctx.test_loader, self.dist, io=exp.io[name],
                                 mask_field=mask, prepare=self.plan.eval_transform, target_field=target)["top1"]
            row[f"top1/{name}"] = other
            m = stats.setdefault("models", {}).setdefault(name, {"best_top1": None, "last_top1": None})
            m["last_top1"] = other
            m["best_top1"] = other if m["best_top1"] is None else max(m["best_top1"], other)
        if exp.cfg.trainer.monitor:  # diagnostics: terms on the evaluation split, never trained (teacher hacking)
            monitored = evaluate_terms(exp, list(exp.cfg.trainer.monitor), ctx.test_loader, self.dist,
                                       self.plan.eval_transform, self.autocast)
            row.update({f"monitor/{t}": v for t, v in monitored.items()})
            stats.setdefault("monitor", {}).update(monitored)
        for c in self.hooked:  # held-out feedback (DistiLLM's adaptive replay)
            c.on_evaluation(dict(row))
        return improved

    def _measure_frozen(self) -> None:
        """Evaluate each frozen model once per round, when first used frozen (published teacher
        checkpoints are known to differ from their claims)."""
        exp = self.exp
        later = {m for plan in exp.stages[self.index + 1:] for m in plan.trained_models}  # students, not teachers
        for name in self.plan.frozen_models:
            key = self.key.of(name)
            if not exp.has_class_head(name) or key in self.record.frozen_top1 or name in later:
                continue
            mask, target = exp.eval_fields(name)
            with self.autocast():
                ev = evaluate(exp.models[name], self.ctx.test_loader, self.dist, io=exp.io[name],
                              mask_field=mask, prepare=self.plan.eval_transform, target_field=target)
            self.record.frozen_top1[key] = ev["top1"]
            if "ppl" in ev:
                self.record.frozen_ppl[key] = ev["ppl"]
            self.ctx.writer.write({"stage": self.plan.name, "model": name, "frozen_top1": ev["top1"], "frozen_top5": ev["top5"]},
                                  self.record.step, tb_prefix=f"{name}/")
            note = "  (RANDOMLY INITIALISED)" if name in exp.random_models else ""
            ppl = f", perplexity {ev['ppl']:.2f}" if "ppl" in ev else ""
            log.info("[%s] frozen %s test top-1 %.2f, top-5 %.2f%s%s", self.plan.name, name, ev["top1"], ev["top5"], ppl, note)
