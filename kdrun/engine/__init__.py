"""The one training engine: every stage of every method runs through :class:`kdrun.engine.trainer.Trainer`."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def run(cfg: Any, run_dir: Path) -> dict[str, Any] | None:
    """Run the validated experiment ``cfg`` in ``run_dir`` (see :class:`kdrun.engine.trainer.Trainer`)."""
    from kdrun.engine.trainer import Trainer

    return Trainer(cfg, run_dir).fit()
