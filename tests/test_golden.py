"""Golden numbers (torchtune style): the quickstart on CPU with ``trainer.deterministic=true`` must keep
producing the losses and accuracies recorded here. Any change to the engine, the builder, the loader
or a loss that alters what a run computes shows up as a difference; a deliberate change updates the
numbers in the same commit and says why.

Recorded with torch 2.14.1 on a 2-core x86-64 VM (commit ac74523, before the engine redesign of
issue 12). The first logged losses are compared tightly; values after hundreds of SGD steps get a
tolerance that covers a different CPU's floating-point summation order, not a change of behaviour.
"""
from __future__ import annotations

import json

import pytest

from kdrun.config import validate
from kdrun.engine import run
from tests.conftest import compose_cfg

# (stage, optimizer step, loss/total) of the first three log rows of each stage (trainer.log_every=15)
FIRST_ROWS = [
    ("teacher", 15, 1.2543809413909912), ("teacher", 30, 0.17855240404605865), ("teacher", 45, 0.10962700098752975),
    ("distill", 555, 16.904842376708984), ("distill", 570, 11.75363540649414), ("distill", 585, 5.744232654571533),
]
DISTILL_TERMS_FIRST_ROW = {"loss/ce": 2.2435903549194336, "loss/kd": 18.533872604370117}
LAST_EPOCH_LOSS = 0.5980671644210815  # distill, epoch 20, loss/total
TOP1 = {"teacher": (99.72144846796657, 99.16434540389972, 5), "distill": (99.16434540389972, 98.8857938718663, 14)}
ONE_TEST_IMAGE = 100 / 359  # percent


@pytest.mark.slow
def test_quickstart_reproduces_its_golden_numbers(tmp_path):
    cfg = validate(compose_cfg(["trainer.deterministic=true", "trainer.device=cpu", "trainer.progress=off",
                                "trainer.tensorboard=false", "trainer.log_every=15"]))
    summary = run(cfg, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss/total" in r and "epoch_time_s" not in r]
    first = [r for r in logged if r["stage"] == "teacher"][:3] + [r for r in logged if r["stage"] == "distill"][:3]
    assert [(r["stage"], r["step"]) for r in first] == [(s, k) for s, k, _ in FIRST_ROWS]
    for r, (_, _, value) in zip(first, FIRST_ROWS):
        assert r["loss/total"] == pytest.approx(value, rel=1e-4), r
    for key, value in DISTILL_TERMS_FIRST_ROW.items():
        assert first[3][key] == pytest.approx(value, rel=1e-4), key
    epochs = [r for r in rows if "epoch_time_s" in r]
    assert [(r["stage"], r["epoch"]) for r in epochs][-1] == ("distill", 20) and len(epochs) == 32
    assert epochs[-1]["loss/total"] == pytest.approx(LAST_EPOCH_LOSS, rel=2e-2)
    assert summary["steps"] == 1440
    for stage, (best, last, best_epoch) in TOP1.items():
        got = summary["stages"][stage]
        assert got["best_top1"] == pytest.approx(best, abs=2 * ONE_TEST_IMAGE + 1e-9), stage
        assert got["last_top1"] == pytest.approx(last, abs=2 * ONE_TEST_IMAGE + 1e-9), stage
    # the teacher of stage 2 is stage 1's last model, evaluated again
    assert summary["frozen_top1"]["teacher"] == summary["stages"]["teacher"]["last_top1"]
    assert summary["best_top1"] == summary["stages"]["distill"]["best_top1"]
