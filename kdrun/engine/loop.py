"""The training loop shared by every stage of every method.

One step (:meth:`StageRunner.train_step`): batch -> batch transform (mixup, if any) -> frozen models
(eval mode, no autograd) -> trained models -> adapters -> loss terms -> ``total = sum(weight * term)``
-> backward -> optimizer step (with co-trained optimizer groups: one backward per group over its own
terms, restricted to its parameters, then every group's step). Loss values are accumulated
on the device and read every ``trainer.log_every`` steps (the only host-device synchronisation in
training besides the end of an epoch). After every epoch: evaluation of the stage's ``eval`` model,
metrics, and the ``last`` (and, on improvement, ``best``) checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdrun.build import GroupPlan, Pipeline, StagePlan, _gather, _instantiate, _names, build
from kdrun.data.arrays import ArrayLoader
from kdrun.data.datasets import DatasetLoader, DatasetSplits
from kdrun.engine.accelerate import autocast, fused_kwargs, grad_scaler, model_callables, to_channels_last
from kdrun.engine.checkpoint import atomic_save, find_checkpoint, load_checkpoint, rng_state, set_rng_state
from kdrun.engine.evaluate import evaluate
from kdrun.engine.probe import linear_probe
from kdrun.engine.rounds import next_round, round_weights
from kdrun.engine import distributed
from kdrun.engine.distributed import all_reduce_sum, check_batch
from kdrun.engine.metrics import MetricsWriter, NullWriter
from kdrun.engine.summary import export_models, write_summary
from kdrun.config import import_target, model_key
from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")


@dataclass
class RunRecord:
    """Where a run stands and what it measured; saved in every checkpoint."""

    stage_index: int = 0
    epoch: int = 0  # epochs completed in stage `stage_index`
    step: int = 0  # optimizer steps over the whole run
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    frozen_top1: dict[str, float] = field(default_factory=dict)
    train_time_s: float = 0.0
    round: int = 0  # self-distillation rounds completed
    rounds: list[dict[str, Any]] = field(default_factory=list)  # per round: accuracies, exported student
    probe: dict[str, Any] = field(default_factory=dict)  # the last linear probe's result


@dataclass
class OptimizerGroup:
    """A stage's optimizer group at run time: its parameters, loss terms, optimizer and scheduler."""

    name: str
    params: list[nn.Parameter]
    losses: list[str]
    optimizer: torch.optim.Optimizer
    scheduler: Any


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def make_loaders(pipe: Pipeline) -> tuple[ArrayLoader | DatasetLoader, ArrayLoader | DatasetLoader]:
    """Loaders for the training and test splits: in-memory arrays, or a DataLoader over Datasets."""
    d, t = pipe.cfg.data, pipe.cfg.trainer
    check_batch(d.batch_size, pipe.dist)
    shard = dict(rank=pipe.dist.rank, world_size=pipe.dist.world_size)
    if isinstance(pipe.data, DatasetSplits):
        common = dict(device=pipe.device, seed=pipe.cfg.seed, num_workers=d.num_workers, **shard)
        return (DatasetLoader(pipe.data.train, batch_size=d.batch_size, train=True, drop_last=d.drop_last,
                              max_batches=t.max_steps_per_epoch, **common),
                DatasetLoader(pipe.data.test, batch_size=d.eval_batch_size, train=False, **common))
    common = dict(mean=list(d.mean), std=list(d.std), device=pipe.device, **shard)
    train = ArrayLoader(pipe.data.train_images, pipe.data.train_labels, batch_size=d.batch_size, train=True,
                        seed=pipe.cfg.seed, crop_padding=d.crop_padding, hflip=d.hflip, drop_last=d.drop_last,
                        max_batches=t.max_steps_per_epoch, **common)
    test = ArrayLoader(pipe.data.test_images, pipe.data.test_labels, batch_size=d.eval_batch_size, train=False, **common)
    if t.channels_last:
        train.channels_last = test.channels_last = True
    return train, test


def long_tail_groups(data: Any) -> dict[str, Tensor] | None:
    """many/medium/few-shot class masks for a long-tailed training set (None for balanced sets)."""
    counts = getattr(data, "train_class_counts", None)
    if counts is None:
        return None
    from kdrun.data.longtail import shot_groups

    return shot_groups(counts)


def _show_progress(setting: str) -> bool:
    return setting == "on" or (setting == "auto" and sys.stderr.isatty())


class StageRunner:
    """Trains one stage: owns its optimizer groups (the main one and any ``co_train`` ones), each with
    its optimizer and scheduler, and the grad scaler."""

    def __init__(self, pipe: Pipeline, plan: StagePlan, index: int, record: RunRecord, writer: MetricsWriter,
                 run_dir: Path, train_loader: ArrayLoader, test_loader: ArrayLoader,
                 round_weights: dict[str, float] | None = None, stats_key: str | None = None,
                 round_index: int = 0) -> None:
        self.pipe, self.plan, self.index, self.record = pipe, plan, index, record
        self.writer, self.run_dir = writer, run_dir
        self.train_loader, self.test_loader = train_loader, test_loader
        cap = pipe.cfg.trainer.max_epochs
        self.epochs = min(plan.epochs, cap) if cap else plan.epochs
        tcfg = pipe.cfg.trainer
        self.groups: list[OptimizerGroup] = [self._make_group(g) for g in plan.groups]
        self.optimizer = self.groups[0].optimizer  # the main group's (its lr is the one logged as `lr`)
        self.scheduler = self.groups[0].scheduler
        # each group's parameters get the gradient of its own terms only, unless the stage shares them
        self.routed = len(self.groups) > 1 and not bool(plan.cfg.get("share_gradients", False))
        self.round_weights = dict(round_weights or {})
        self._set_modes()  # DDP wraps only modules whose parameters require grad
        for name in plan.losses:  # terms with stage-dependent objectives (FT's init stage)
            if hasattr(pipe.losses[name].module, "set_stage"):
                pipe.losses[name].module.set_stage(plan.name)
        self.calls = self._callables()
        precision = str(tcfg.precision)  # read once: a DictConfig lookup per step costs ~12 us
        self.autocast = lambda: autocast(pipe.device, precision)
        self.scaler = grad_scaler(pipe.device, precision)
        self.per_step_schedule = plan.cfg.scheduler_interval == "step"
        self.transform = pipe.batch_transform
        reads = {n for t in plan.losses for n in _names(pipe.losses[t].inputs)}
        reads |= {n for a in plan.adapters for n in _names(pipe.adapters[a].inputs)}
        # without a mixing transform, `batch.soft_target` is the one-hot target
        self.num_classes = int(pipe.cfg.data.num_classes) if "batch.soft_target" in reads and self.transform is None else 0
        self.stats_key = stats_key or plan.name
        self.round_index = int(round_index)
        self.class_groups = long_tail_groups(pipe.data)

    def _make_group(self, group: GroupPlan) -> OptimizerGroup:
        pipe, plan = self.pipe, self.plan
        modules = [pipe.models[m] for m in group.models]
        modules += [pipe.adapters[a].module for a in group.adapters if pipe.adapters[a].trainable]
        modules += [pipe.losses[t].module for t in group.losses]
        params = [p for m in modules for p in m.parameters()]
        key = f"stages.{plan.name}" + ("" if group.name == "main" else f".co_train.{group.name}")
        if not params:
            raise KdrunError(f"{key}: nothing to train (its models and loss terms have no parameters)")
        target = import_target(group.optimizer._target_, f"{key}.optimizer")
        extra = fused_kwargs(target, pipe.device, pipe.cfg.trainer.fused_optimizer)
        optimizer = _instantiate(group.optimizer, params, **extra)
        scheduler = _instantiate(group.scheduler, optimizer) if group.scheduler is not None else None
        return OptimizerGroup(group.name, params, list(group.losses), optimizer, scheduler)

    def _callables(self) -> dict[str, Any]:
        """What the step calls: frozen models as prepared by ``run``; under DDP, the stage's trained
        models and trainable adapters/loss terms wrapped in DistributedDataParallel (then compiled)."""
        pipe, plan, tcfg = self.pipe, self.plan, self.pipe.cfg.trainer
        calls: dict[str, Any] = dict(pipe.callables)
        calls.update({f"adapters.{a}": pipe.adapters[a].module for a in plan.adapters})
        calls.update({f"loss.{t}": pipe.losses[t].module for t in plan.losses})
        if not pipe.dist.enabled:
            return calls
        ids = [pipe.device.index if pipe.device.index is not None else torch.cuda.current_device()] if pipe.device.type == "cuda" else None

        def wrap(module: nn.Module, buffers: bool, unused: bool) -> Any:
            with warnings.catch_warnings():  # broadcast_buffers=False is still the way to keep rank-local buffers
                warnings.simplefilter("ignore", FutureWarning)
                return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=buffers,
                                               find_unused_parameters=unused)

        reads = {n for t in plan.losses for n in _names(pipe.losses[t].inputs)}
        for name in plan.trained_models:
            # a stage that never reads a model's logits leaves its head without gradient (AB/FT init stages)
            ddp = wrap(pipe.models[name], True, unused=f"{name}.logits" not in reads)
            calls[name] = model_callables(nn.ModuleDict({name: ddp}), tcfg.compile, tcfg.compile_mode, tcfg.compile_backend)[name]
        for key in list(calls):
            module = calls[key]
            if key.startswith(("adapters.", "loss.")) and any(p.requires_grad for p in module.parameters()):
                if not (key.startswith("adapters.") and not pipe.adapters[key[9:]].trainable):
                    calls[key] = wrap(module, False, unused=True)  # loss state (memory banks) stays per rank
        return calls

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Every optimizer group's optimizer and scheduler state, and the grad scaler's."""
        return {"groups": {g.name: {"optimizer": g.optimizer.state_dict(),
                                    "scheduler": g.scheduler.state_dict() if g.scheduler else None}
                           for g in self.groups},
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        groups = state.get("groups") or {"main": {"optimizer": state["optimizer"], "scheduler": state.get("scheduler")}}
        if set(groups) != {g.name for g in self.groups}:
            raise KdrunError(f"resume: the checkpoint's stage '{self.plan.name}' has optimizer groups {sorted(groups)}, "
                             f"this config has {sorted(g.name for g in self.groups)}")
        for g in self.groups:
            g.optimizer.load_state_dict(groups[g.name]["optimizer"])
            if g.scheduler is not None and groups[g.name].get("scheduler") is not None:
                g.scheduler.load_state_dict(groups[g.name]["scheduler"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    # ------------------------------------------------------------------------------ modes
    def _set_modes(self) -> None:
        pipe, plan = self.pipe, self.plan
        for name, model in pipe.models.items():
            trains = name in plan.trained_models
            model.train(trains)
            model.requires_grad_(trains)
        for name, spec in pipe.adapters.items():
            trains = name in plan.adapters and spec.trainable
            spec.module.train(trains)
            spec.module.requires_grad_(trains)
        for spec in pipe.losses.values():
            spec.module.train(True)

    # ------------------------------------------------------------------------------ step
    def forward_losses(self, batch: dict[str, Tensor], weights: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """The namespace of one batch, every loss term, and the weighted total."""
        total, values, _ = self._forward(batch, weights)
        return total, values

    def _forward(self, batch: dict[str, Tensor], weights: dict[str, float]
                 ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """Weighted total, detached term values, and every weighted term (for gradient routing)."""
        pipe, plan = self.pipe, self.plan
        ns: dict[str, Tensor] = {f"batch.{k}": v for k, v in batch.items()}
        x = batch["input"]
        call = self.calls
        with torch.no_grad():
            for name in plan.frozen_models:
                ns[f"{name}.logits"] = call[name](x)
                ns.update({f"{name}.{k}": v for k, v in pipe.recorders[name].pop().items()})
        for name in plan.trained_models:
            ns[f"{name}.logits"] = call[name](x)
            ns.update({f"{name}.{k}": v for k, v in pipe.recorders[name].pop().items()})
        for name in plan.adapters:
            spec = pipe.adapters[name]
            ns[f"adapters.{name}"] = call[f"adapters.{name}"](**_gather(ns, spec.inputs))
        total = torch.zeros((), device=x.device)
        values: dict[str, Tensor] = {}
        weighted: dict[str, Tensor] = {}
        for name in plan.losses:
            spec = pipe.losses[name]
            out = call[f"loss.{name}"](**_gather(ns, spec.inputs))
            if isinstance(out, dict):
                for part, v in out.items():
                    values[f"{name}.{part}"] = v.detach()
                out = torch.stack([v.float() for v in out.values()]).sum()
            values[name] = out.detach()
            weighted[name] = weights[name] * out
            total = total + weighted[name]
        return total, values, weighted

    def train_step(self, batch: dict[str, Tensor], weights: dict[str, float]) -> tuple[Tensor, dict[str, Tensor]]:
        """One optimizer step of every group on ``batch``: batch transform, forward, backward, step.

        With several optimizer groups (``co_train``) and routing on, group g's parameters receive
        ``d(sum of g's weighted terms)/d(theta_g)`` only: one backward per group, restricted to
        the group's parameters (``inputs=``), so a student's loss never reaches a co-trained
        teacher (and the reverse). Returns the weighted total and the detached term values.
        """
        if self.transform is not None:
            batch = self.transform(batch)
        elif self.num_classes:
            batch = {**batch, "soft_target": F.one_hot(batch["target"], self.num_classes).float()}
        with self.autocast():
            total, values, weighted = self._forward(batch, weights)
        for g in self.groups:
            g.optimizer.zero_grad(set_to_none=True)
        if self.routed:
            last = len(self.groups) - 1
            for i, g in enumerate(self.groups):
                objective = torch.stack([weighted[t].float() for t in g.losses]).sum()
                self.scaler.scale(objective).backward(inputs=g.params, retain_graph=i < last)
        else:
            self.scaler.scale(total).backward()
        for g in self.groups:
            self.scaler.step(g.optimizer)
        self.scaler.update()
        if self.per_step_schedule:
            for g in self.groups:
                if g.scheduler is not None:
                    g.scheduler.step()
        return total, values

    def _weights(self, epoch: int) -> dict[str, float]:
        out = {}
        for name in self.plan.losses:
            spec = self.pipe.losses[name]
            ramp = min(1.0, (epoch + 1) / spec.warmup_epochs) if spec.warmup_epochs > 0 else 1.0
            out[name] = self.round_weights.get(name, spec.weight) * ramp
        return out

    # ------------------------------------------------------------------------------ epochs
    def run(self) -> None:
        pipe, plan, record = self.pipe, self.plan, self.record
        self._measure_frozen()
        if record.epoch == 0 and not has_class_head(pipe, plan.eval_model):
            log.info("[%s] %s's output %s has no column per class (%d): its top-1 is not measured%s", self.stats_key,
                     plan.eval_model, tuple(pipe.shapes[f"{plan.eval_model}.logits"]), int(pipe.cfg.data.num_classes),
                     "; the linear probe judges its features" if pipe.cfg.get("probe") is not None else "")
        stats = record.stages.setdefault(self.stats_key, {
            "eval_model": plan.eval_model, "epochs": self.epochs, "best_top1": None, "best_top5": None,
            "best_epoch": None, "last_top1": None, "last_top5": None,
        })
        for epoch in range(record.epoch, self.epochs):
            self._set_modes()
            for spec in (pipe.losses[t] for t in plan.losses):
                if hasattr(spec.module, "set_progress"):
                    spec.module.set_progress(epoch, self.epochs)
            t0 = time.perf_counter()
            train_metrics = self._train_epoch(epoch)
            if pipe.device.type == "cuda":
                torch.cuda.synchronize(pipe.device)
            seconds = time.perf_counter() - t0
            record.train_time_s += seconds
            if not self.per_step_schedule:
                for g in self.groups:
                    if g.scheduler is not None:
                        g.scheduler.step()
            record.epoch = epoch + 1
            last = epoch + 1 == self.epochs
            samples = train_metrics.pop("_samples")
            row: dict[str, Any] = {"stage": plan.name, "epoch": epoch + 1, "step": record.step, **train_metrics,
                                   "epoch_time_s": seconds, "images_per_s": samples / max(seconds, 1e-9)}
            improved = False
            if ((epoch + 1) % pipe.cfg.trainer.eval_every == 0 or last) and has_class_head(pipe, plan.eval_model):
                with self.autocast():
                    ev = evaluate(pipe.models[plan.eval_model], self.test_loader, pipe.dist, self.class_groups)
                row.update({"top1": ev["top1"], "top5": ev["top5"], "test_loss": ev["loss"]})
                row.update({f"top1_{g}": v for g, v in ev.get("group_top1", {}).items()})
                stats["last_top1"], stats["last_top5"] = ev["top1"], ev["top5"]
                if "group_top1" in ev:
                    stats["last_shot_top1"] = ev["group_top1"]
                if stats["best_top1"] is None or ev["top1"] > stats["best_top1"]:
                    stats.update(best_top1=ev["top1"], best_top5=ev["top5"], best_epoch=epoch + 1)
                    if "group_top1" in ev:
                        stats["best_shot_top1"] = ev["group_top1"]
                    improved = True
                row["best_top1"] = stats["best_top1"]
            if (epoch + 1) % pipe.cfg.trainer.eval_every == 0 or last:
                for name in plan.trained_models:  # co-trained models (DML peers, online teachers)
                    if name == plan.eval_model or not has_class_head(pipe, name):
                        continue
                    with self.autocast():
                        other = evaluate(pipe.models[name], self.test_loader, pipe.dist)["top1"]
                    row[f"top1/{name}"] = other
                    m = stats.setdefault("models", {}).setdefault(name, {"best_top1": None, "last_top1": None})
                    m["last_top1"] = other
                    m["best_top1"] = other if m["best_top1"] is None else max(m["best_top1"], other)
            if self.stats_key != plan.name:
                row["round"] = self.stats_key.split("/", 1)[0]
            self.writer.write(row, record.step, tb_prefix=f"{self.stats_key}/")
            log.info("[%s] epoch %d/%d  loss %.4f  %s %.0f img/s  %.1fs", self.stats_key, epoch + 1, self.epochs,
                     row.get("loss/total", float("nan")),
                     f"{plan.eval_model} top-1 {row['top1']:.2f} (best {stats['best_top1']:.2f}) " if "top1" in row else "",
                     row["images_per_s"], seconds)
            if improved or last or (epoch + 1) % pipe.cfg.trainer.save_every == 0:
                self._save(best=improved)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        pipe, record = self.pipe, self.record
        loader = self.train_loader
        loader.set_epoch((self.round_index * 1009 + self.index) * 100_003 + epoch)  # a new order per round, stage, epoch
        weights = self._weights(epoch)
        log_every = max(1, int(pipe.cfg.trainer.log_every))
        keys: list[str] | None = None
        acc: Tensor | None = None
        epoch_acc: Tensor | None = None
        since, steps, samples = 0, 0, 0
        bar = tqdm(total=len(loader), desc=f"{self.plan.name} {epoch + 1}/{self.epochs}", leave=False,
                   disable=not _show_progress(pipe.cfg.trainer.progress), dynamic_ncols=True)
        epoch_means: dict[str, float] = {}
        for batch in loader:
            total, values = self.train_step(batch, weights)
            record.step += 1
            steps += 1
            samples += batch["target"].shape[0]
            if keys is None:
                keys = ["total", *values]
            vec = torch.stack([total.detach().float(), *(values[k].float() for k in keys[1:])])
            acc = vec if acc is None else acc + vec
            epoch_acc = vec if epoch_acc is None else epoch_acc + vec
            since += 1
            bar.update(1)
            if since == log_every:
                means = self._flush(keys, acc / since, epoch)
                bar.set_postfix(loss=f"{means['loss/total']:.4f}")
                acc, since = None, 0
        bar.close()
        if keys is None:
            raise KdrunError(f"stages.{self.plan.name}: the training set gave no batch (data.batch_size larger than the set with drop_last?)")
        if since:
            self._flush(keys, acc / since, epoch)
        epoch_acc = all_reduce_sum(epoch_acc, pipe.dist) / pipe.dist.world_size
        epoch_means = {f"loss/{k}": v for k, v in zip(keys, (epoch_acc / steps).tolist())}
        epoch_means["lr"] = self.optimizer.param_groups[0]["lr"]
        for g in self.groups[1:]:
            epoch_means[f"lr/{g.name}"] = g.optimizer.param_groups[0]["lr"]
        epoch_means["_samples"] = samples * pipe.dist.world_size
        return epoch_means

    def _flush(self, keys: list[str], means: Tensor, epoch: int) -> dict[str, float]:
        if self.pipe.dist.enabled:  # every rank sees the same means, so every rank stops on a non-finite one
            means = all_reduce_sum(means.clone(), self.pipe.dist) / self.pipe.dist.world_size
        values = means.tolist()
        for k, v in sorted(zip(keys, values), key=lambda kv: kv[0] == "total"):  # name a term before the total
            if not math.isfinite(v):
                raise KdrunError(
                    f"loss term '{k}' became {v} in stage '{self.plan.name}' epoch {epoch + 1} (step {self.record.step}); "
                    f"lower the learning rate or the term's weight, or check its inputs"
                )
        row = {f"loss/{k}": v for k, v in zip(keys, values)}
        row["lr"] = self.optimizer.param_groups[0]["lr"]
        self.writer.write({"stage": self.plan.name, "epoch": epoch + 1, "step": self.record.step, **row},
                          self.record.step, tb_prefix=f"{self.plan.name}/train/")
        return row

    def _measure_frozen(self) -> None:
        for name in self.plan.frozen_models:
            if not has_class_head(self.pipe, name):
                continue
            key = name if self.stats_key == self.plan.name else f"{self.stats_key.split('/', 1)[0]}/{name}"
            if key in self.record.frozen_top1:
                continue
            with self.autocast():
                ev = evaluate(self.pipe.models[name], self.test_loader, self.pipe.dist)
            self.record.frozen_top1[key] = ev["top1"]
            self.writer.write({"stage": self.plan.name, "model": name, "frozen_top1": ev["top1"], "frozen_top5": ev["top5"]},
                              self.record.step, tb_prefix=f"{name}/")
            note = "  (RANDOMLY INITIALISED)" if name in self.pipe.random_models else ""
            log.info("[%s] frozen %s test top-1 %.2f, top-5 %.2f%s", self.plan.name, name, ev["top1"], ev["top5"], note)

    def _save(self, best: bool) -> None:
        save_checkpoint(self.pipe, self.record, self.state_dict(), self.run_dir, best)


def has_class_head(pipe: Pipeline, name: str) -> bool:
    """Whether model ``name``'s output has one column per class (a projection head has not: its top-1
    is not measured; a linear probe judges its features)."""
    shape = pipe.shapes.get(f"{name}.logits")
    return shape is None or (len(shape) == 2 and shape[1] == int(pipe.cfg.data.num_classes))


def save_checkpoint(pipe: Pipeline, record: RunRecord, stage_state: dict[str, Any] | None, run_dir: Path,
                    best: bool = False) -> None:
    """``checkpoints/last.pt`` (and ``best.pt``): every module, the stage's optimizer groups, where
    the run stands (round, stage, epoch, step), its records and every RNG state."""
    if not pipe.dist.is_main or not pipe.cfg.trainer.save_checkpoints:
        return
    state = {
        "modules": pipe.modules().state_dict(),
        "stage": stage_state,
        "record": dataclasses.asdict(record),
        "rng": rng_state(),
        "stage_names": [p.name for p in pipe.stages],
    }
    ckpt_dir = Path(run_dir) / "checkpoints"
    atomic_save(state, ckpt_dir / "last.pt")
    if best:
        atomic_save(state, ckpt_dir / "best.pt")


def _finish_round(pipe: Pipeline, record: RunRecord, writer: MetricsWriter, run_dir: Path, r: int, count: int) -> None:
    """After the last stage (of round ``r``): the linear probe; with rounds, the round's record and
    exported student, then the student becomes the next round's teacher (checkpointed)."""
    cfg = pipe.cfg
    if cfg.get("probe") is not None:
        record.probe = linear_probe(pipe)
        row = {"probe_top1": record.probe["probe_top1"], **{f"probe_top1/{k}": v for k, v in record.probe["probe"].items()}}
        writer.write({"round": r + 1, **row} if cfg.get("rounds") is not None else row, record.step, tb_prefix="probe/")
        for name, top1 in record.probe["probe"].items():
            log.info("linear probe on %s.%s: test top-1 %.2f", name, cfg.probe.tap, top1)
    rounds = cfg.get("rounds")
    if rounds is None:
        return
    final = record.stages.get(f"round{r + 1}/{pipe.stages[-1].name}", {})
    entry: dict[str, Any] = {"round": r + 1, "best_top1": final.get("best_top1"), "last_top1": final.get("last_top1"),
                             "teacher_top1": record.frozen_top1.get(f"round{r + 1}/{rounds.teacher}"),
                             "weights": round_weights(cfg, r)}
    if record.probe:
        entry["probe_top1"] = record.probe["probe_top1"]
    if pipe.dist.is_main:
        path = Path(run_dir) / f"{rounds.student}_round{r + 1}.pt"
        atomic_save({"model": {k: v.detach().cpu() for k, v in pipe.models[rounds.student].state_dict().items()}}, path)
        entry["exported"] = str(path)
    record.rounds = [e for e in record.rounds if e["round"] != r + 1] + [entry]
    writer.write({"round": r + 1, "round_best_top1": entry["best_top1"], "round_last_top1": entry["last_top1"]},
                 record.step, tb_prefix="rounds/")
    log.info("round %d/%d: %s top-1 %s (best %s)", r + 1, count, rounds.student, entry["last_top1"], entry["best_top1"])
    if r + 1 < count:
        next_round(pipe, r)
        record.round, record.stage_index, record.epoch = r + 1, 0, 0
        save_checkpoint(pipe, record, None, run_dir)


def _warn_random(pipe: Pipeline) -> None:
    for name in pipe.random_models:
        bar = "!" * 78
        key = model_key(name)
        log.warning("\n%s\n!! %s is RANDOMLY INITIALISED (%s.checkpoint=null) and used frozen: the results are those of a\n"
                    "!! random %s, not of a trained one.\n%s", bar, name, key, name, bar)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Run every stage of the experiment ``cfg`` in ``run_dir``; return the summary (None on ranks > 0)."""
    start = time.perf_counter()
    run_dir = Path(run_dir)
    info = distributed.init(cfg.trainer.device)
    if not info.is_main:
        log.setLevel(logging.WARNING)
    seed_everything(int(cfg.seed), bool(cfg.trainer.deterministic))
    pipe = build(cfg, info)
    tcfg = cfg.trainer
    if tcfg.channels_last:
        for module in pipe.modules().values():
            to_channels_last(module)
    pipe.callables = model_callables(pipe.models, tcfg.compile, tcfg.compile_mode, tcfg.compile_backend)
    record = RunRecord()
    ckpt = None
    if cfg.get("resume"):
        path = find_checkpoint(str(cfg.resume), run_dir)
        if path is not None:
            ckpt = load_checkpoint(path)
            names = [p.name for p in pipe.stages]
            if ckpt.get("stage_names") != names:
                raise KdrunError(f"resume: {path} was written by a run with stages {ckpt.get('stage_names')}, this one has {names}")
            pipe.modules().load_state_dict(ckpt["modules"])
            record = RunRecord(**ckpt["record"])
            set_rng_state(ckpt["rng"])
            log.info("resuming from %s: stage '%s', %d epochs done", path, names[min(record.stage_index, len(names) - 1)], record.epoch)
    if info.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
        if getattr(pipe.data, "kept_indices", None) is not None:  # which training images a long-tailed run used
            (run_dir / "kept_indices.json").write_text(json.dumps({
                "imbalance_factor": getattr(pipe.data, "imbalance_factor", None),
                "train_class_counts": pipe.data.train_class_counts.tolist(),
                "kept_indices": pipe.data.kept_indices.tolist()}))
        _warn_random(pipe)
    writer = MetricsWriter(run_dir, tensorboard=bool(cfg.trainer.tensorboard)) if info.is_main else NullWriter()
    train_loader, test_loader = make_loaders(pipe)
    rounds = cfg.get("rounds")
    count = int(rounds.count) if rounds is not None else 1
    try:
        for r in range(record.round, count):
            weights = round_weights(cfg, r) if rounds is not None else None
            for index, plan in enumerate(pipe.stages):
                if index < record.stage_index:
                    continue
                key = f"round{r + 1}/{plan.name}" if rounds is not None else None
                runner = StageRunner(pipe, plan, index, record, writer, run_dir, train_loader, test_loader,
                                     round_weights=weights, stats_key=key, round_index=r)
                if ckpt is not None and index == record.stage_index and record.epoch > 0:
                    runner.load_state_dict(ckpt["stage"])
                ckpt = None
                runner.run()
                if index + 1 < len(pipe.stages):
                    record.stage_index, record.epoch = index + 1, 0
            _finish_round(pipe, record, writer, run_dir, r, count)
    finally:
        writer.close()
    if not info.is_main:
        distributed.barrier(info)
        return None
    exported = export_models(pipe, run_dir)
    summary = write_summary(pipe, record, run_dir, exported, wall_time_s=time.perf_counter() - start)
    distributed.barrier(info)
    return summary
