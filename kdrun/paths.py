"""Where the shipped configs and recipes are: inside the package when installed from a wheel
(``kdrun/configs``, ``kdrun/recipes``), at the top of the repository in a source checkout or an
editable install (``configs/``, ``recipes/``)."""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _first(*candidates: Path) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(f"kdrun's shipped configs are missing; looked in {', '.join(map(str, candidates))}")


def run_name_problem(name: object) -> str | None:
    """What is wrong with ``name`` as the run directory's path component (``outputs/<name>/...``), or None."""
    if isinstance(name, str) and name and "/" not in name and len(name.encode()) <= 200:
        return None
    text = str(name)
    return (f"name is part of the run directory's path: a non-empty name without '/' of at most 200 bytes, "
            f"got {text[:60]!r}{'...' if len(text) > 60 else ''}")


def config_dir() -> Path:
    """The folder holding ``kdrun.yaml`` and the config groups."""
    return _first(_PKG / "configs", _PKG.parent / "configs")


def recipe_dir() -> Path:
    """The folder of the bundled recipes (the ``recipe`` config group)."""
    return _first(_PKG / "recipes", _PKG.parent / "recipes")
