"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``.

A training checkpoint holds every module (models, adapters, loss terms with their buffers), the
stage's optimizer, scheduler and grad-scaler states and the epoch's running sums, where training
stands (round, stage, epoch, micro-batch, step), the run's records (best/last accuracy per stage,
teacher accuracies) and every RNG state, so that resume continues exactly, also mid-epoch. Exported models are ``{'model': state_dict}`` files that any run accepts as
``<model>.checkpoint``.
"""
from __future__ import annotations

import dataclasses
import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kdrun.errors import KdrunError

if TYPE_CHECKING:
    from kdrun.engine.distributed import DistInfo
    from kdrun.engine.record import RunRecord
    from kdrun.experiment import Experiment


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that a crash leaves either the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_training_state(experiment: Experiment, record: RunRecord, stage_state: dict[str, Any] | None, run_dir: Path,
                        best: bool, dist: DistInfo) -> None:
    """``checkpoints/last.pt`` (and ``best.pt``): every module, the stage's optimizer groups and
    running sums, where the run stands (round, stage, epoch, batch, step), its records and every RNG
    state. Rank 0 writes; nothing is written with ``trainer.save_checkpoints=false``."""
    if not experiment.cfg.trainer.save_checkpoints:
        return
    modules = experiment.modules().state_dict()
    if experiment.sharded:  # a collective: every rank gathers, rank 0 writes full tensors
        from kdrun.engine.fsdp import gather_full

        modules, stage_state = gather_full(modules), gather_full(stage_state)
    if not dist.is_main:
        return
    state = {
        "modules": modules,
        "stage": stage_state,
        "record": dataclasses.asdict(record),
        "rng": rng_state(),
        "stage_names": [p.name for p in experiment.stages],
    }
    ckpt_dir = Path(run_dir) / "checkpoints"
    atomic_save(state, ckpt_dir / "last.pt")
    if best:
        atomic_save(state, ckpt_dir / "best.pt")


def rng_state() -> dict[str, Any]:
    """Every random generator kdrun or user code may draw from, in a weights-only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], np_state[1].tolist(), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuplify(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def find_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """The checkpoint ``resume`` names: ``auto`` -> this run's last.pt if any; a directory -> its
    checkpoints/last.pt; a file -> itself."""
    if resume == "auto":
        path = run_dir / "checkpoints" / "last.pt"
        return path if path.is_file() else None
    path = Path(resume).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise KdrunError(f"resume={resume}: no checkpoint at {path}")
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as ex:
        raise KdrunError(f"cannot read checkpoint {path}: {str(ex).splitlines()[0]}") from None
