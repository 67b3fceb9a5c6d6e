"""The training loop shared by every stage of every method.

One step: batch -> frozen models (eval mode, no autograd) -> trained models -> adapters -> loss
terms -> ``total = sum(weight * term)`` -> backward -> optimizer step. Loss values are accumulated
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
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from kdrun.build import Pipeline, StagePlan, _gather, _instantiate, _names, build
from kdrun.data.arrays import ArrayLoader
from kdrun.data.datasets import DatasetLoader, DatasetSplits
from kdrun.engine.accelerate import autocast, fused_kwargs, grad_scaler, model_callables, to_channels_last
from kdrun.engine.checkpoint import atomic_save, find_checkpoint, load_checkpoint, rng_state, set_rng_state
from kdrun.engine.evaluate import evaluate
from kdrun.engine import distributed
from kdrun.engine.distributed import all_reduce_sum, check_batch
from kdrun.engine.metrics import MetricsWriter, NullWriter
from kdrun.engine.summary import export_models, write_summary
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
    """Trains one stage: owns its optimizer and scheduler."""

    def __init__(self, pipe: Pipeline, plan: StagePlan, index: int, record: RunRecord, writer: MetricsWriter,
                 run_dir: Path, train_loader: ArrayLoader, test_loader: ArrayLoader) -> None:
        self.pipe, self.plan, self.index, self.record = pipe, plan, index, record
        self.writer, self.run_dir = writer, run_dir
        self.train_loader, self.test_loader = train_loader, test_loader
        cap = pipe.cfg.trainer.max_epochs
        self.epochs = min(plan.epochs, cap) if cap else plan.epochs
        self.trainable: list[nn.Module] = [pipe.models[m] for m in plan.trained_models]
        self.trainable += [pipe.adapters[a].module for a in plan.adapters if pipe.adapters[a].trainable]
        self.trainable += [pipe.losses[t].module for t in plan.losses]
        params = [p for m in self.trainable for p in m.parameters()]
        if not params:
            raise KdrunError(f"stages.{plan.name}: nothing to train (its models and loss terms have no parameters)")
        tcfg = pipe.cfg.trainer
        target = pipe.cfg.stages[plan.name].optimizer._target_
        from kdrun.config import import_target

        extra = fused_kwargs(import_target(target, f"stages.{plan.name}.optimizer"), pipe.device, tcfg.fused_optimizer)
        self.optimizer = _instantiate(plan.cfg.optimizer, params, **extra)
        self._set_modes()  # DDP wraps only modules whose parameters require grad
        for name in plan.losses:  # terms with stage-dependent objectives (FT's init stage)
            if hasattr(pipe.losses[name].module, "set_stage"):
                pipe.losses[name].module.set_stage(plan.name)
        self.calls = self._callables()
        precision = str(tcfg.precision)  # read once: a DictConfig lookup per step costs ~12 us
        self.autocast = lambda: autocast(pipe.device, precision)
        self.scaler = grad_scaler(pipe.device, precision)
        self.scheduler = _instantiate(plan.cfg.scheduler, self.optimizer) if plan.cfg.scheduler is not None else None
        self.per_step_schedule = plan.cfg.scheduler_interval == "step"
        self.class_groups = long_tail_groups(pipe.data)

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
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None,
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
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
        for name in plan.losses:
            spec = pipe.losses[name]
            out = call[f"loss.{name}"](**_gather(ns, spec.inputs))
            if isinstance(out, dict):
                for part, v in out.items():
                    values[f"{name}.{part}"] = v.detach()
                out = torch.stack([v.float() for v in out.values()]).sum()
            values[name] = out.detach()
            total = total + weights[name] * out
        return total, values

    def _weights(self, epoch: int) -> dict[str, float]:
        out = {}
        for name in self.plan.losses:
            spec = self.pipe.losses[name]
            ramp = min(1.0, (epoch + 1) / spec.warmup_epochs) if spec.warmup_epochs > 0 else 1.0
            out[name] = spec.weight * ramp
        return out

    # ------------------------------------------------------------------------------ epochs
    def run(self) -> None:
        pipe, plan, record = self.pipe, self.plan, self.record
        self._measure_frozen()
        stats = record.stages.setdefault(plan.name, {
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
            if self.scheduler is not None and not self.per_step_schedule:
                self.scheduler.step()
            record.epoch = epoch + 1
            last = epoch + 1 == self.epochs
            samples = train_metrics.pop("_samples")
            row: dict[str, Any] = {"stage": plan.name, "epoch": epoch + 1, "step": record.step, **train_metrics,
                                   "epoch_time_s": seconds, "images_per_s": samples / max(seconds, 1e-9)}
            improved = False
            if (epoch + 1) % pipe.cfg.trainer.eval_every == 0 or last:
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
            self.writer.write(row, record.step, tb_prefix=f"{plan.name}/")
            log.info("[%s] epoch %d/%d  loss %.4f  %s %.0f img/s  %.1fs", plan.name, epoch + 1, self.epochs,
                     row.get("loss/total", float("nan")),
                     f"{plan.eval_model} top-1 {row['top1']:.2f} (best {stats['best_top1']:.2f}) " if "top1" in row else "",
                     row["images_per_s"], seconds)
            if improved or last or (epoch + 1) % pipe.cfg.trainer.save_every == 0:
                self._save(best=improved)

    def _train_epoch(self, epoch: int) -> dict[str, Any]:
        pipe, record = self.pipe, self.record
        loader = self.train_loader
        loader.set_epoch(self.index * 100_003 + epoch)
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
            with self.autocast():
                total, values = self.forward_losses(batch, weights)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(total).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            if self.scheduler is not None and self.per_step_schedule:
                self.scheduler.step()
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
            if name in self.record.frozen_top1:
                continue
            with self.autocast():
                ev = evaluate(self.pipe.models[name], self.test_loader, self.pipe.dist)
            self.record.frozen_top1[name] = ev["top1"]
            self.writer.write({"stage": self.plan.name, "model": name, "frozen_top1": ev["top1"], "frozen_top5": ev["top5"]},
                              self.record.step, tb_prefix=f"{name}/")
            note = "  (RANDOMLY INITIALISED)" if name in self.pipe.random_models else ""
            log.info("[%s] frozen %s test top-1 %.2f, top-5 %.2f%s", self.plan.name, name, ev["top1"], ev["top5"], note)

    def _save(self, best: bool) -> None:
        if not self.pipe.dist.is_main or not self.pipe.cfg.trainer.save_checkpoints:
            return
        state = {
            "modules": self.pipe.modules().state_dict(),
            "stage": self.state_dict(),
            "record": dataclasses.asdict(self.record),
            "rng": rng_state(),
            "stage_names": [p.name for p in self.pipe.stages],
        }
        ckpt_dir = self.run_dir / "checkpoints"
        atomic_save(state, ckpt_dir / "last.pt")
        if best:
            atomic_save(state, ckpt_dir / "best.pt")


def _warn_random(pipe: Pipeline) -> None:
    for name in pipe.random_models:
        bar = "!" * 78
        log.warning("\n%s\n!! %s is RANDOMLY INITIALISED (%s.checkpoint=null) and used frozen: the results are those of a\n"
                    "!! random %s, not of a trained one.\n%s", bar, name, name, name, bar)


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
    try:
        for index, plan in enumerate(pipe.stages):
            if index < record.stage_index:
                continue
            runner = StageRunner(pipe, plan, index, record, writer, run_dir, train_loader, test_loader)
            if ckpt is not None and index == record.stage_index and record.epoch > 0:
                runner.load_state_dict(ckpt["stage"])
            runner.run()
            if index + 1 < len(pipe.stages):
                record.stage_index, record.epoch = index + 1, 0
    finally:
        writer.close()
    if not info.is_main:
        distributed.barrier(info)
        return None
    exported = export_models(pipe, run_dir)
    summary = write_summary(pipe, record, run_dir, exported, wall_time_s=time.perf_counter() - start)
    distributed.barrier(info)
    return summary
