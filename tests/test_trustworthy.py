"""Runs that can be trusted: out-of-range input refused before training, smoke runs marked, non-finite
values stopped before they reach a checkpoint, interruptions that save and say how to resume, failure
records, one run per directory (issue 15)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kdrun.build import build
from kdrun.config import validate
from kdrun.errors import KdrunError
from tests.conftest import compose_cfg, run_cli

QUIET = ["trainer.progress=off", "trainer.tensorboard=false"]
SMALL = ["data.subset=128", *QUIET]


def check(overrides: list[str], recipe: str = "quickstart") -> None:
    build(validate(compose_cfg(overrides, recipe)))


@pytest.mark.parametrize("override, words", [
    ("trainer.max_epochs=0", "trainer.max_epochs must be an integer of at least 1 (or null: no cap)"),
    ("trainer.max_epochs=-1", "trainer.max_epochs must be"),
    ("trainer.max_steps_per_epoch=0", "trainer.max_steps_per_epoch must be"),
    ("data.subset=0", "data.subset must be"),
    ("data.subset=-10", "data.subset must be"),
    ("data.batch_size=0", "data.batch_size must be"),
    ("data.eval_batch_size=-1", "data.eval_batch_size must be"),
    ("data.crop_padding=-2", "data.crop_padding must be"),
    ("seed=-1", "seed must be an integer"),
    ("seed=1e30", "seed must be an integer"),
    ("seed=abc", "seed must be an integer"),
    ("loss.kd.weight=-1", "loss.kd.weight must be a finite number >= 0"),
    ("loss.kd.warmup_epochs=-3", "loss.kd.warmup_epochs must be"),
    ("trainer.eval_every=0", "trainer.eval_every must be at least 1"),
    ("trainer.log_every=-5", "trainer.log_every must be at least 1"),
    # a later stage's optimizer is checked before the first stage trains
    ("stages.distill.optimizer.lr=-0.1", "stages.distill.optimizer (lr=-0.1"),
    ("stages.distill.optimizer.lr=1e40", "overflow"),
    ("data.mean=[0.5,0.5]", "data.mean has 2 values but digits's images have 1 channels"),
    ("data.std=[0]", "data.std must be positive"),
    ("data.num_classes=5", "data.num_classes=5, but digits's labels run from 0 to 9: set data.num_classes=10"),
])
def test_out_of_range_values_are_errors_before_training(override, words):
    with pytest.raises(KdrunError) as info:
        check([override])
    assert words in str(info.value)


def test_subset_run_says_what_it_covers_and_is_not_comparable(tmp_path):
    from kdrun.engine import run

    cfg = validate(compose_cfg(["data.subset=100", "trainer.max_epochs=1", *QUIET]))
    summary = run(cfg, tmp_path)
    assert summary["comparable"] is False
    assert summary["not_comparable"] == ["data.subset=100", "trainer.max_epochs=1 (stages teacher, distill configured for more)"]
    assert summary["data_coverage"] == {"train": 10, "test": 10}
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["comparable"] is False


def test_smoke_runs_stay_out_of_the_published_comparison(tmp_path):
    from kdrun.report import main as report_main

    def run_dir(name: str, smoke: list[str]) -> None:
        d = tmp_path / name
        d.mkdir()
        pub = {"source": "paper", "metric": "best", "top1": 76.0, "reproduced": 10.0, "comparable": not smoke,
               "delta": None if smoke else -66.0}
        (d / "summary.json").write_text(json.dumps({
            "name": "cifar100_kd", "method": "KD", "data": "cifar100", "teacher": "resnet32x4", "student": "resnet8x4",
            "seed": 0, "best_top1": 10.0, "last_top1": 10.0, "published": pub, "comparable": not smoke,
            "not_comparable": smoke, "stages": {}}))

    run_dir("smoke", ["data.subset=2000"])
    out = tmp_path / "t.csv"
    assert report_main([str(tmp_path), "--csv", str(out)]) == 0
    assert "76.00" not in out.read_text() and "-66" not in out.read_text()
    assert report_main([str(tmp_path), "--csv", str(out), "--include-smoke"]) == 0
    assert "76.0" in out.read_text()


# --------------------------------------------------------------------------------- non-finite values

@pytest.mark.slow
def test_a_diverging_term_is_named_and_never_checkpointed(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["loss.kd.weight=1e40", "stages.teacher.epochs=1", f"hydra.run.dir={run}", *SMALL], tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "loss term 'kd' (weight 1e+40) became non-finite in stage 'distill' at step 1" in proc.stderr
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)  # the teacher stage's, untouched
    assert state["record"]["stage_index"] == 0 and state["record"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["modules"].values() if v.is_floating_point())
    proc = run_cli(["stages.distill.optimizer.lr=1e30", "stages.teacher.epochs=1", f"hydra.run.dir={tmp_path / 'lr'}",
                    *SMALL], tmp_path)
    assert proc.returncode == 2 and "every loss term (ce, kd) became non-finite at once" in proc.stderr
    assert "learning rate too large" in proc.stderr
