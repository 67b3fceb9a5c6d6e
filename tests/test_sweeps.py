"""Sweeps through the CLI: Hydra multirun layout, the returned objective, failed jobs, Optuna, validation split."""
import json

import yaml

from tests.conftest import run_cli
import pytest

pytestmark = pytest.mark.slow  # subprocesses: deselect with -m 'not slow'

TINY = ["data.subset=128", "trainer.max_epochs=1", "trainer.progress=off", "trainer.tensorboard=false"]


def test_multirun_makes_one_run_directory_per_job_and_survives_a_failed_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", *TINY, "loss.kd.temperature=2,4", "stages.distill.losses=[ce,kd],[ce,nope]",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    # the sweep runs every job, then exits non-zero naming how many failed
    assert proc.returncode == 1 and f"kdrun: 2 of 4 jobs failed (see the FAILED files under {sweep})" in proc.stderr
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    done = [p for p in jobs if (p / "summary.json").is_file()]
    failed = [p for p in jobs if (p / "FAILED").is_file()]
    assert len(done) == 2 and len(failed) == 2
    assert "no loss term 'nope'" in (failed[0] / "FAILED").read_text()
    temps = sorted(o for p in done for o in json.loads((p / "summary.json").read_text())["overrides"] if "temperature" in o)
    assert temps == ["loss.kd.temperature=2", "loss.kd.temperature=4"]
    assert yaml.safe_load((sweep / "multirun.yaml").read_text())["hydra"]["mode"] == "MULTIRUN"


def test_optuna_optimises_the_objective_on_a_validation_split(tmp_path):
    sweep = tmp_path / "opt"
    proc = run_cli(["-m", "+recipe=cifar100_kd_optuna", "teacher=cnn_small", "student=cnn_tiny", "data=synthetic",
                    "data.num_classes=100", "data.val_split=64", "teacher.checkpoint=null", "trainer.max_epochs=1",
                    "trainer.progress=off", "trainer.tensorboard=false", "hydra.sweeper.n_trials=2",
                    f"hydra.sweep.dir={sweep}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    best = max(json.loads((sweep / str(i) / "summary.json").read_text())["best_top1"] for i in range(2))
    assert results["best_value"] == best
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["eval_set"] == "validation" and "published" not in summary
