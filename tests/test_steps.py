"""Step-based stages: max_steps (instead of, or capping, epochs), warm-up + cosine/linear schedules by
step with the stage's length passed in, evaluation and checkpoints every N steps."""
from __future__ import annotations

import json
import math

import pytest
import torch

from kdrun.config import validate
from kdrun.engine import run
from kdrun.engine.schedules import warmup_cosine, warmup_cosine_factor, warmup_linear, warmup_linear_factor
from kdrun.errors import KdrunError
from tests.conftest import compose_cfg

# 192 training digits in batches of 32: 6 optimizer steps per epoch
FAST = ["data.subset=192", "trainer.progress=off", "trainer.tensorboard=false", "trainer.device=cpu", "trainer.log_every=1"]


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_warmup_schedules_by_hand():
    w, total = 3, 11
    for s in range(total + 2):
        cos = s / w if s < w else 0.5 * (1 + math.cos(math.pi * min(1.0, (s - w) / (total - w))))
        lin = s / w if s < w else max(0.0, (total - s) / (total - w))
        assert warmup_cosine_factor(s, total, w) == pytest.approx(cos)
        assert warmup_linear_factor(s, total, w) == pytest.approx(lin)
    assert warmup_cosine_factor(total, total, w, min_lr_ratio=0.1) == pytest.approx(0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_linear(opt, total_steps=10, warmup_ratio=0.2)  # 2 warm-up steps
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 1.0, 2.0, 2.0 * 7 / 8])
    with pytest.raises(KdrunError, match="total_steps must be at least 1"):
        warmup_cosine(opt, total_steps=0)


def test_max_steps_ends_a_stage_mid_epoch_and_caps_epochs(tmp_path):
    with pytest.raises(KdrunError, match=r"stages.teacher.scheduler.T_max is null .*warmup_cosine"):
        run(validate(compose_cfg(FAST + ["stages.teacher.epochs=null", "stages.teacher.max_steps=11"])), tmp_path / "x")
    cfg = validate(compose_cfg(FAST + ["stages.teacher.epochs=null", "stages.teacher.max_steps=11",
                                       "stages.teacher.scheduler.T_max=2", "stages.distill.epochs=3",
                                       "stages.distill.max_steps=4"]))
    summary = run(cfg, tmp_path)
    assert summary["stages"]["teacher"]["steps"] == 11 and summary["stages"]["teacher"]["epochs"] == 2
    assert summary["stages"]["distill"]["steps"] == 4 and summary["stages"]["distill"]["epochs"] == 1
    assert summary["steps"] == 15
    epochs = [(r["stage"], r["epoch"], r["step"]) for r in rows(tmp_path) if "epoch_time_s" in r]
    assert epochs == [("teacher", 1, 6), ("teacher", 2, 11), ("distill", 1, 15)]


def test_step_schedule_gets_the_stage_length_and_warms_up(tmp_path):
    cfg = validate(compose_cfg(FAST + ["sched@stages.teacher.scheduler=warmup_cosine", "stages.teacher.scheduler_interval=step",
                                       "stages.teacher.scheduler.warmup_steps=3", "stages.teacher.epochs=null",
                                       "stages.teacher.max_steps=11", "stages.distill.max_steps=1"]))
    run(cfg, tmp_path)
    base = cfg.stages.teacher.optimizer.lr
    logged = [(r["step"], r["lr"]) for r in rows(tmp_path) if r.get("stage") == "teacher" and "loss/total" in r
              and "epoch_time_s" not in r]
    assert [s for s, _ in logged] == list(range(1, 12))
    for step, lr in logged:  # the lr of the next step, after `step` scheduler steps
        assert lr == pytest.approx(base * warmup_cosine_factor(step, 11, 3)), step


def test_evaluation_every_n_steps(tmp_path):
    cfg = validate(compose_cfg(FAST + ["trainer.eval_every_steps=4", "stages.teacher.epochs=2", "stages.distill.epochs=1",
                                       "trainer.log_every=50"]))
    summary = run(cfg, tmp_path)
    mid = [(r["stage"], r["step"]) for r in rows(tmp_path) if "top1" in r and "epoch_time_s" not in r]
    assert mid == [("teacher", 4), ("teacher", 8), ("distill", 16)]  # stage-local steps 4, 8; 4 (at run step 16)
    assert summary["stages"]["teacher"]["best_step"] in (4, 6, 8, 12)


def test_stage_length_and_step_settings_are_checked():
    with pytest.raises(KdrunError, match="stages.teacher: set epochs .* or max_steps"):
        validate(compose_cfg(FAST + ["stages.teacher.epochs=null"]))
    with pytest.raises(KdrunError, match="stages.teacher.max_steps must be at least 1"):
        validate(compose_cfg(FAST + ["stages.teacher.max_steps=0"]))
    with pytest.raises(KdrunError, match="trainer.accumulate_grad_batches must be at least 1"):
        validate(compose_cfg(FAST + ["trainer.accumulate_grad_batches=0"]))
    with pytest.raises(KdrunError, match="trainer.save_every_steps must be at least 1"):
        validate(compose_cfg(FAST + ["trainer.save_every_steps=0"]))
