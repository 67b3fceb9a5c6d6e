"""The one training engine: every stage of every method runs through :func:`kdrun.engine.loop.run`."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def run(cfg: Any, run_dir: Path) -> dict[str, Any] | None:
    """Run the validated experiment ``cfg`` in ``run_dir`` (see :func:`kdrun.engine.loop.run`)."""
    from kdrun.engine.loop import run as run_loop

    return run_loop(cfg, run_dir)
