"""Shared test helpers: compose configs in-process (fast) and run the CLI in a subprocess (real)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

from kdrun.registry import compose_config

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar100"


def compose_cfg(overrides: list[str], recipe: str | None = "quickstart") -> DictConfig:
    """The config ``kdrun +recipe=<recipe> <overrides>`` would run (Hydra keys excluded)."""
    return compose_config(overrides, recipe)


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m kdrun ARGS`` in ``cwd`` and return the finished process (text output)."""
    env = dict(os.environ)
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "kdrun", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture()
def fast_digits() -> list[str]:
    """Overrides that make the quickstart a few-second run."""
    return ["data.subset=256", "trainer.max_epochs=1", "trainer.progress=off", "trainer.tensorboard=false"]
