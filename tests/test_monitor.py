"""trainer.monitor: loss terms evaluated on the evaluation split at every evaluation, never trained (the
teacher-hacking diagnostics: a student's divergence to an oracle beside the proxy to its teacher)."""
from __future__ import annotations

import json

import pytest
import torch

from kdrun.config import validate
from kdrun.engine import run
from kdrun.engine.evaluate import evaluate_terms
from kdrun.errors import KdrunError
from kdrun.losses import TokenDivergence
from tests.conftest import compose_cfg

SMALL = ["trainer.device=cpu", "trainer.progress=off", "trainer.tensorboard=false", "trainer.save_checkpoints=false",
         "data.source.max_train_blocks=8", "data.source.max_test_blocks=3", "stages.oracle.max_steps=2",
         "stages.teacher.max_steps=2", "stages.student.max_steps=2", "trainer.eval_every_steps=1"]


def test_monitors_are_the_token_mean_over_the_evaluation_split():
    from kdrun.engine.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(validate(compose_cfg(SMALL, recipe="text_teacher_hacking")), __import__("tempfile").mkdtemp())
    trainer.prepare()
    exp = trainer.experiment
    got = evaluate_terms(exp, ["proxy", "golden"], trainer.ctx.test_loader)
    # by hand: every test token's KL, averaged over all of them at once
    num = {"proxy": 0.0, "golden": 0.0}
    den = 0
    kl = TokenDivergence(kind="fkl")
    with torch.no_grad():
        for batch in trainer.ctx.test_loader:
            out = {m: exp.models[m].eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                   for m in ("student", "teacher", "oracle")}
            n = int(batch["token_mask"].sum())
            num["proxy"] += float(kl(out["student"], out["teacher"], batch["token_mask"])) * n
            num["golden"] += float(kl(out["student"], out["oracle"], batch["token_mask"])) * n
            den += n
    assert got["proxy"] == pytest.approx(num["proxy"] / den, rel=1e-5)
    assert got["golden"] == pytest.approx(num["golden"] / den, rel=1e-5)
    for m in ("student", "teacher", "oracle"):
        exp.models[m].train()
    evaluate_terms(exp, ["proxy"], trainer.ctx.test_loader)
    assert all(exp.models[m].training for m in ("student", "teacher", "oracle"))  # their modes are restored


def test_a_run_logs_proxy_and_golden_at_every_evaluation(tmp_path):
    torch.manual_seed(0)
    run(validate(compose_cfg(SMALL, recipe="text_teacher_hacking")), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "monitor/proxy" in r]
    assert {r["stage"] for r in evals} == {"oracle", "teacher", "student"} and len(evals) >= 6
    assert all(r["monitor/golden"] > 0 and r["monitor/proxy"] > 0 for r in evals)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "monitor" in json.dumps(summary)


def test_a_monitor_must_be_a_defined_term():
    with pytest.raises(KdrunError, match="trainer.monitor: no loss term 'gold'"):
        validate(compose_cfg(SMALL + ["trainer.monitor=[gold]"], recipe="text_teacher_hacking"))
