"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``.

A training checkpoint holds every module (models, adapters, loss terms with their buffers), the
stage's optimizer, scheduler and grad-scaler states and the epoch's running sums, where training
stands (round, stage, epoch, micro-batch, step), the run's records (best/last accuracy per stage,
teacher accuracies) and every RNG state (under data parallelism every rank's: each rank draws its own
streams), so that resume continues exactly, also mid-epoch. Exported models are ``{'model': state_dict}``
files that any run accepts as ``<model>.checkpoint``.
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

from kdrun.engine.distributed import all_gather_object
from kdrun.errors import KdrunError, first_line

if TYPE_CHECKING:
    from kdrun.engine.distributed import DistInfo
    from kdrun.engine.record import RunRecord
    from kdrun.experiment import Experiment


TMP_SUFFIX = ".tmp"  # atomic_save's temporary files are ``.<name>.<random>.tmp`` beside their target


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` so that a crash leaves either the old file or the new one, never half.

    A failed write (disk full, read-only folder) removes its temporary file, keeps the old ``path``
    and raises one KdrunError naming the file; a SIGKILL mid-write leaves the temporary file, which
    :func:`remove_partial_writes` clears at the next start."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as ex:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        # torch's zip writer reports a full disk as a RuntimeError ("unexpected pos ...", "file write failed")
        io_error = isinstance(ex, OSError) or (isinstance(ex, RuntimeError) and any(
            w in str(ex) for w in ("unexpected pos", "write failed", "PytorchStreamWriter")))
        if io_error:
            raise KdrunError(write_failure(path, ex)) from None
        raise


def write_error_reason(ex: BaseException) -> str:
    """Why a write failed, in words: a full disk, an unwritable folder, a name too long, or the OS's own text."""
    import errno

    code = getattr(ex, "errno", None)
    text = str(ex)
    if code == errno.ENOSPC or "No space left" in text or "unexpected pos" in text:
        return "the disk is full"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable (permissions or a read-only file system)"
    if code == errno.ENAMETOOLONG:
        return "a name in it is too long for the file system"
    return getattr(ex, "strerror", None) or first_line(ex)


def write_failure(path: Path, ex: BaseException) -> str:
    """One message for a file kdrun could not write: which file, why, and what is kept."""
    return (f"cannot write {path}: {write_error_reason(ex)}. The previous version of the file, if any, is unchanged; "
            f"free space or fix the folder, then resume.")


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Delete the temporary files of checkpoint and export writes that a killed process left in
    ``run_dir`` and ``run_dir/checkpoints``; return them."""
    out = []
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if folder.is_dir():
            for tmp in folder.glob(f".*.pt.*{TMP_SUFFIX}"):
                tmp.unlink(missing_ok=True)
                out.append(tmp)
    return out


def save_training_state(experiment: Experiment, record: RunRecord, stage_state: dict[str, Any] | None, run_dir: Path,
                        best: bool, dist: DistInfo, writer_rows: int | None = None) -> None:
    """``checkpoints/last.pt`` (and ``best.pt``): every module, the stage's optimizer groups and
    running sums, where the run stands (round, stage, epoch, batch, step), its records and every RNG
    state. Rank 0 writes; nothing is written with ``trainer.save_checkpoints=false``. ``writer_rows``: the
    rows of metrics.jsonl so far (a resume drops the rows written after this checkpoint)."""
    if not experiment.cfg.trainer.save_checkpoints:
        return
    if writer_rows is not None:
        record.metrics_rows = writer_rows
    modules = experiment.modules().state_dict()
    if experiment.sharded:  # a collective: every rank gathers, rank 0 writes full tensors
        from kdrun.engine.fsdp import gather_full

        modules, stage_state = gather_full(modules), gather_full(stage_state)
    rng = rng_state()
    rng_ranks = all_gather_object(rng, dist) if dist.enabled else None  # each rank draws its own streams
    if not dist.is_main:
        return
    state = {
        "modules": modules,
        "stage": stage_state,
        "record": dataclasses.asdict(record),
        "rng": rng,
        "stage_names": [p.name for p in experiment.stages],
    }
    if rng_ranks is not None:
        state["rng_ranks"] = rng_ranks
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


def read_tensors_file(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure one message naming ``what``
    (the config key or "resume") and the file: empty, truncated or corrupt, or holding Python objects
    beyond tensors (which are never unpickled: loading them could run code)."""
    import pickle
    import warnings

    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as ex:
        raise KdrunError(f"{what}: cannot read {path}: {ex.strerror}") from None
    if size == 0:
        raise KdrunError(f"{what}: {path} is empty (a copy or a write that did not finish?); use another checkpoint")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as ex:
        if "weights only" in str(ex).lower():
            raise KdrunError(f"{what}: {path} holds Python objects besides tensors, which kdrun does not unpickle "
                             f"(that could run code). Save a plain state dict from the code that made it: "
                             f"torch.save({{'model': model.state_dict()}}, path)") from None
        raise KdrunError(f"{what}: {path} is truncated or corrupt ({first_line(ex)})") from None
    except OSError as ex:
        raise KdrunError(f"{what}: cannot read {path}: {ex.strerror or first_line(ex)}"
                         f"{' (truncated or corrupt?)' if ex.errno == 22 else ''}") from None
    except Exception as ex:
        raise KdrunError(f"{what}: {path} is truncated or corrupt, not a torch checkpoint ({first_line(ex)})") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = read_tensors_file(path, "resume")
    if not isinstance(state, dict) or "modules" not in state or "record" not in state:
        raise KdrunError(f"resume: {path} is not a kdrun training checkpoint (checkpoints/last.pt or best.pt); an "
                         f"exported model file loads as <model>.checkpoint=... instead")
    return state
