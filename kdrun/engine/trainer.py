"""The public engine API: ``Trainer(cfg, run_dir)``, ``prepare()`` and ``fit()``.

::

    trainer = Trainer(validate(cfg), run_dir)
    experiment = trainer.prepare()      # process group, seed, build, channels_last, compile, loaders, resume
    summary = trainer.fit()             # every round x stage, then exports and summary.json

``prepare()`` is also the seam for tools that drive the engine themselves (the benchmark, the tests):
``trainer.stage_runner(i)`` gives the :class:`~kdrun.engine.stage.StageRunner` of stage ``i`` with its
real optimizer groups, ``runner.train_epoch(e)`` or ``runner.train_step(batch, runner.term_weights(e))``
run it.
"""
from __future__ import annotations

import json
import logging
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from kdrun.build import build
from kdrun.data.loaders import make_loader
from kdrun.engine import distributed
from kdrun.engine.accelerate import RecompileLimitWatch, compile_budget, model_callables, to_channels_last
from kdrun.engine.checkpoint import (atomic_save, find_checkpoint, load_checkpoint, remove_partial_writes, save_training_state,
                                     set_rng_state, write_failure)
from kdrun.engine.distributed import DistInfo, check_batch, resolve_device
from kdrun.engine.metrics import MetricsWriter, NullWriter
from kdrun.engine.interrupt import InterruptFlag, RunInterrupted, requeue_slurm_job, requeued_slurm_job
from kdrun.engine.probe import linear_probe
from kdrun.engine.record import RunKey, RunRecord
from kdrun.engine.rounds import next_round
from kdrun.engine.runlock import LOCK_NAME, RunLock
from kdrun.engine.stage import RunContext, StageRunner
from kdrun.engine.summary import export_models, write_summary
from kdrun.errors import KdrunError
from kdrun.experiment import Experiment
from kdrun.plan import model_key, round_weights
from kdrun.schema import ExperimentConfig, experiment_config

log = logging.getLogger("kdrun")


def set_cuda_flags(cudnn_benchmark: bool, tf32: bool, deterministic: bool) -> None:
    """``trainer.cudnn_benchmark`` (never under ``deterministic``, whose algorithms must not be chosen by
    timing) and ``trainer.tf32``: TF32 for float32 matmuls and cuDNN convolutions. Off, both leave
    PyTorch's defaults (no autotuning; TF32 convolutions on, TF32 matmuls off)."""
    if cudnn_benchmark and not deterministic:
        torch.backends.cudnn.benchmark = True
    if tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def seed_streams(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_everything(seed: int, deterministic: bool) -> None:
    """Seed Python, NumPy and torch; with ``deterministic`` also force deterministic kernels."""
    seed_streams(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def long_tail_groups(data: Any) -> dict[str, torch.Tensor] | None:
    """many/medium/few-shot class masks for a long-tailed training set (None for balanced sets)."""
    counts = getattr(data, "train_class_counts", None)
    if counts is None:
        return None
    from kdrun.data.longtail import shot_groups

    return shot_groups(counts)


class Trainer:
    """Runs one experiment in ``run_dir``: every stage of every round, then exports and summary.json.

    ``cfg`` is a validated config (:func:`kdrun.config.validate`) or its typed form. ``dist`` is the
    process layout when the caller has set up the process group itself (default: found from the
    environment, torchrun's or SLURM's, and joined in :meth:`prepare`)."""

    def __init__(self, cfg: DictConfig | ExperimentConfig, run_dir: Path | str, dist: DistInfo | None = None) -> None:
        self.cfg = cfg if isinstance(cfg, ExperimentConfig) else experiment_config(cfg)
        self.run_dir = Path(run_dir)
        self.dist = dist
        self.experiment: Experiment | None = None
        self.ctx: RunContext | None = None
        self.checkpoint: dict[str, Any] | None = None  # what resume loaded, until its stage state is used
        self.started = time.perf_counter()
        self.lock = RunLock(self.run_dir)
        self.compile_watch: RecompileLimitWatch | None = None

    # ------------------------------------------------------------------------------ prepare
    def prepare(self) -> Experiment:
        """Join the process group, seed, build the experiment, apply channels_last and compile, resume
        from a checkpoint if asked, write the run directory's config, make the loaders."""
        tcfg = self.cfg.trainer
        info = self.dist or distributed.init(tcfg.device, tcfg.dist_timeout_s)
        if not info.is_main:
            log.setLevel(logging.WARNING)
        else:
            self._lock_run_dir()
        try:
            return self._prepare(info)
        except BaseException:
            self.lock.release()
            raise

    def _lock_run_dir(self) -> None:
        """Take the run directory's lock (a second run in it is refused) and clear what a killed
        checkpoint write left behind."""
        try:
            self.lock.acquire()
        except OSError as ex:
            raise KdrunError(write_failure(self.run_dir / LOCK_NAME, ex)) from None
        removed = remove_partial_writes(self.run_dir)
        if removed:
            log.info("removed %d partial file(s) of an interrupted checkpoint write: %s", len(removed),
                     ", ".join(p.name for p in removed))

    def _prepare(self, info: DistInfo) -> Experiment:
        cfg, tcfg = self.cfg, self.cfg.trainer
        seed_everything(cfg.seed, tcfg.deterministic)
        set_cuda_flags(tcfg.cudnn_benchmark, tcfg.tf32, tcfg.deterministic)
        exp = build(cfg, resolve_device(tcfg.device, info), sync_batchnorm=tcfg.sync_batchnorm and info.enabled)
        if tcfg.fsdp:
            from kdrun.engine.fsdp import check_supported, shard_models

            check_supported(cfg, info.world_size if info.enabled else 0)
            shard_models(exp.models, exp.device, info.world_size)
            exp.sharded = True
        if info.enabled:
            # the models are built (identically on every rank, from ``seed``); from here on each rank draws
            # its own random numbers (mixup, dropout, a custom transform's), as one process's draws differ
            # from sample to sample. What must agree across ranks has its own generator (the loaders'
            # orders and crops, CRD's negatives, TRG's token draws).
            seed_streams(distributed.rank_seed(cfg.seed, info.rank))
        if tcfg.channels_last:
            for module in exp.modules().values():
                to_channels_last(module)
        if tcfg.compile:  # a fresh compilation cache per run: nothing inherited from an earlier run in this process
            import torch._dynamo

            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, compile_budget(exp.models))
            self.compile_watch = RecompileLimitWatch(exp.models).install()
        # compile_scope=step compiles each stage's whole forward instead (StageRunner), except under DDP/FSDP
        per_model = tcfg.compile and (tcfg.compile_scope == "models" or info.enabled)
        exp.forwards = model_callables(exp.models, per_model, tcfg.compile_mode, tcfg.compile_backend)
        record = self._resume(exp, info)
        if info.is_main:
            self._write_run_dir(exp)
        resumed = self.checkpoint is not None
        writer = (MetricsWriter(self.run_dir, tensorboard=tcfg.tensorboard, resume_rows=record.metrics_rows if resumed else None,
                                resume_step=record.step if resumed else None) if info.is_main else NullWriter())
        train, test = self._loaders(exp, info)
        self.experiment = exp
        self.ctx = RunContext(exp, record, writer, self.run_dir, train, test, info, long_tail_groups(exp.data))
        return exp

    def _loaders(self, exp: Experiment, info: DistInfo) -> tuple[Any, Any]:
        cfg = self.cfg
        check_batch(cfg.data.batch_size, info)
        cap = cfg.trainer.max_steps_per_epoch
        common = dict(seed=cfg.seed, rank=info.rank, world_size=info.world_size, channels_last=cfg.trainer.channels_last)
        train = make_loader(exp.data, "train", cfg.data, exp.device, train=True,
                            max_batches=cap * cfg.trainer.accumulate_grad_batches if cap else None, **common)
        return train, make_loader(exp.data, "test", cfg.data, exp.device, train=False, **common)

    def _resume(self, exp: Experiment, info: DistInfo) -> RunRecord:
        resume = self.cfg.resume
        if not resume and requeued_slurm_job():
            resume = "auto"  # a requeued SLURM job continues from its own checkpoint
            log.info("SLURM requeued this job (SLURM_RESTART_COUNT=%s): resume=auto", os.environ.get("SLURM_RESTART_COUNT"))
        if not resume:
            return RunRecord()
        path = find_checkpoint(str(resume), self.run_dir)
        if path is None:
            bar = "!" * 78
            log.warning("\n%s\n!! resume=auto: no checkpoint in %s, so this run STARTS FROM SCRATCH.\n!! To continue "
                        "a run, pass its directory: hydra.run.dir=<run dir> resume=auto, or resume=<run dir>.\n%s",
                        bar, self.run_dir / "checkpoints", bar)
            return RunRecord()
        ckpt = load_checkpoint(path)
        names = [p.name for p in exp.stages]
        if ckpt.get("stage_names") != names:
            raise KdrunError(f"resume: {path} was written by a run with stages {ckpt.get('stage_names')}, this one has {names}")
        modules = exp.modules()
        if exp.sharded:
            from kdrun.engine.fsdp import shard_state_dict

            modules.load_state_dict(shard_state_dict(modules, ckpt["modules"]))
        else:
            modules.load_state_dict(ckpt["modules"])
        record = RunRecord(**ckpt["record"])
        self._restore_rng(ckpt, path, info)
        self.checkpoint = ckpt
        log.info("resuming from %s: stage '%s', %d epochs and %d batches done", path,
                 names[min(record.stage_index, len(names) - 1)], record.epoch, record.batch)
        return record

    def _restore_rng(self, ckpt: dict[str, Any], path: Path, info: DistInfo) -> None:
        """Each rank continues its own random streams from the checkpoint. A checkpoint of another
        number of ranks cannot give them: the streams restart from (seed, rank, step), with a warning."""
        ranks = ckpt.get("rng_ranks")
        if ranks is not None and len(ranks) == info.world_size:
            set_rng_state(ranks[info.rank])
        elif not info.enabled and ranks is None:
            set_rng_state(ckpt["rng"])
        else:
            saved = len(ranks) if ranks is not None else 1
            step = int(ckpt["record"].get("step", 0))
            seed_streams(distributed.rank_seed(self.cfg.seed * 1_000_003 + step, info.rank))
            if info.is_main:
                log.warning("resume: %s was written by %d process(es), this run has %d: the random streams (mixup, "
                            "dropout) restart from (seed, rank, step %d) instead of continuing; the data order continues "
                            "exactly", path, saved, info.world_size, step)

    def _write_run_dir(self, exp: Experiment) -> None:
        (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg.raw, self.run_dir / "config.yaml", resolve=True)
        data = exp.data
        if getattr(data, "kept_indices", None) is not None:  # which training images a long-tailed run used
            (self.run_dir / "kept_indices.json").write_text(json.dumps({
                "imbalance_factor": data.imbalance_factor, "train_class_counts": data.train_class_counts.tolist(),
                "kept_indices": data.kept_indices.tolist()}))
        for name in exp.random_models:
            bar = "!" * 78
            why = (f"{model_key(name)}.checkpoint=null" if self.cfg.models[name].checkpoint is None else
                   f"{model_key(name)}.checkpoint filled fewer than half of its tensors")
            log.warning("\n%s\n!! %s is RANDOMLY INITIALISED (%s) and used frozen: the results are those "
                        "of a\n!! random %s, not of a trained one.\n%s", bar, name, why, name, bar)

    # ------------------------------------------------------------------------------ fit
    def stage_runner(self, index: int, round_index: int = 0) -> StageRunner:
        """The runner of stage ``index`` in round ``round_index`` (0-based), with that round's weights."""
        if self.ctx is None:
            self.prepare()
        assert self.ctx is not None
        cfg = self.cfg
        key = RunKey(round_index, self.ctx.experiment.stages[index].name, with_rounds=cfg.rounds is not None)
        return StageRunner(self.ctx, index, key, round_weights(cfg, round_index) if cfg.rounds is not None else None)

    def fit(self) -> dict[str, Any] | None:
        """Run every round and stage from where the record stands; return the summary (None on ranks > 0)."""
        if self.ctx is None:
            self.prepare()
        ctx = self.ctx
        assert ctx is not None
        record, count = ctx.record, self.cfg.rounds.count if self.cfg.rounds is not None else 1
        ctx.interrupts = InterruptFlag().install()
        try:
            for r in range(record.round, count):
                for index in range(record.stage_index, len(ctx.experiment.stages)):
                    runner = self.stage_runner(index, r)
                    if self.checkpoint is not None and (record.epoch > 0 or record.batch > 0) and self.checkpoint["stage"]:
                        runner.load_state_dict(self.checkpoint["stage"])
                    self.checkpoint = None
                    runner.run()
                    if index + 1 < len(ctx.experiment.stages):
                        record.start_stage(index + 1)
                self._finish_round(r, count)
            return self._finish()
        except RunInterrupted as ex:
            if ctx.dist.is_main:
                requeue_slurm_job(ex.signum)
            raise
        finally:
            ctx.interrupts.restore()
            ctx.writer.close()
            self.lock.release()
            if self.compile_watch is not None:
                self.compile_watch.remove()

    def _finish_round(self, r: int, count: int) -> None:
        """After the last stage (of round ``r``): the linear probe; with rounds, the round's record and
        exported student, then the student becomes the next round's teacher (checkpointed)."""
        ctx, cfg = self.ctx, self.cfg
        assert ctx is not None
        exp, record = ctx.experiment, ctx.record
        if cfg.probe is not None:
            record.probe = linear_probe(exp)
            row = {"probe_top1": record.probe["probe_top1"], **{f"probe_top1/{k}": v for k, v in record.probe["probe"].items()}}
            ctx.writer.write({"round": r + 1, **row} if cfg.rounds is not None else row, record.step, tb_prefix="probe/")
            for name, top1 in record.probe["probe"].items():
                log.info("linear probe on %s.%s: test top-1 %.2f", name, cfg.probe.tap, top1)
        rounds = cfg.rounds
        if rounds is None:
            return
        key = RunKey(r, exp.stages[-1].name, with_rounds=True)
        final = record.stages.get(key.label, {})
        entry: dict[str, Any] = {"round": r + 1, "best_top1": final.get("best_top1"), "last_top1": final.get("last_top1"),
                                 "teacher_top1": record.frozen_top1.get(key.of(rounds.teacher)), "weights": round_weights(cfg, r)}
        if record.probe:
            entry["probe_top1"] = record.probe["probe_top1"]
        if ctx.dist.is_main:
            path = self.run_dir / f"{rounds.student}_round{r + 1}.pt"
            atomic_save({"model": {k: v.detach().cpu() for k, v in exp.models[rounds.student].state_dict().items()}}, path)
            entry["exported"] = str(path)
        record.rounds = [e for e in record.rounds if e["round"] != r + 1] + [entry]
        ctx.writer.write({"round": r + 1, "round_best_top1": entry["best_top1"], "round_last_top1": entry["last_top1"]},
                         record.step, tb_prefix="rounds/")
        log.info("round %d/%d: %s top-1 %s (best %s)", r + 1, count, rounds.student, entry["last_top1"], entry["best_top1"])
        if r + 1 < count:
            next_round(exp, r)
            record.round = r + 1
            record.start_stage(0)
            save_training_state(exp, record, None, self.run_dir, False, ctx.dist, ctx.writer.rows)

    def _finish(self) -> dict[str, Any] | None:
        ctx = self.ctx
        assert ctx is not None
        info = ctx.dist
        exp = ctx.experiment
        states = None
        if exp.sharded:  # every rank takes part in gathering the shards; rank 0 writes
            from kdrun.engine.fsdp import gather_full

            states = {name: gather_full(exp.models[name].state_dict()) for name in exp.trained_models}
        generation = self._generation() if self.cfg.generation is not None else None
        if not info.is_main:
            distributed.barrier(info)
            return None
        rounds = self.cfg.rounds
        final = RunKey(rounds.count - 1 if rounds is not None else 0, exp.stages[-1].name, with_rounds=rounds is not None)
        exported = export_models(exp, self.run_dir, states)
        summary = write_summary(exp, ctx.record, self.run_dir, exported, time.perf_counter() - self.started, final.label,
                                generation)
        distributed.barrier(info)
        return summary


    def _generation(self) -> dict[str, Any] | None:
        """The ``generation:`` evaluation, by rank 0 alone (None on the other ranks). Sharded models are gathered
        whole on every rank first (a collective), so that rank 0 holds the full weights while it generates; the
        other ranks wait inside the gathered context, then every rank shards them again."""
        from kdrun.engine.fsdp import fsdp_units, gathered
        from kdrun.engine.generation import evaluate_generation

        ctx = self.ctx
        assert ctx is not None and self.cfg.generation is not None
        exp, info = ctx.experiment, ctx.dist
        names = [n for n in self.cfg.generation.models if n in exp.models]
        units = [u for n in names for u in fsdp_units(exp.models[n])] if exp.sharded else []
        if not units and not info.is_main:
            return None
        with gathered(units):
            out = (evaluate_generation(dict(exp.models.items()), self.cfg.generation, exp.data, exp.device, self.run_dir)
                   if info.is_main else None)
            if units:
                distributed.barrier(info)
        return out


def run(cfg: DictConfig | ExperimentConfig, run_dir: Path | str) -> dict[str, Any] | None:
    """Run the validated experiment ``cfg`` in ``run_dir``; return the summary (None on ranks > 0)."""
    return Trainer(cfg, run_dir).fit()
