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


def config_dir() -> Path:
    """The folder holding ``kdrun.yaml`` and the config groups."""
    return _first(_PKG / "configs", _PKG.parent / "configs")


def recipe_dir() -> Path:
    """The folder of the bundled recipes (the ``recipe`` config group)."""
    return _first(_PKG / "recipes", _PKG.parent / "recipes")
