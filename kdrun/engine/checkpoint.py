"""Checkpoints: written atomically (temporary file, fsync, rename), read with ``weights_only=True``.

A training checkpoint holds every module (models, adapters, loss terms with their buffers), the
stage's optimizer, scheduler and grad-scaler states, where training stands (stage, epoch, step), the
run's records (best/last accuracy per stage, teacher accuracies) and every RNG state, so that resume
continues exactly. Exported models are ``{'model': state_dict}`` files that any run accepts as
``<model>.checkpoint``.
"""
from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdrun.errors import KdrunError


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
