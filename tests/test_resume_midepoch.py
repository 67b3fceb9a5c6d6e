"""Mid-epoch checkpoints and exact resume: a run killed (SIGKILL) after a mid-epoch checkpoint resumes
at that step with the same data order and RNG, and ends with the weights and metrics of a run that was
never interrupted (CPU, trainer.deterministic=true)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

pytestmark = pytest.mark.slow  # three CLI runs in subprocesses

# 256 digits in batches of 32: 8 steps per epoch; mixup draws from the global RNG every step
ARGS = ["data.subset=256", "stages.teacher.epochs=2", "stages.distill.epochs=2", "trainer.save_every_steps=5",
        "trainer.log_every=3", "trainer.deterministic=true", "trainer.device=cpu", "trainer.progress=off",
        "trainer.tensorboard=false"]
KILL = """_target_: tests.helpers.KillAtCall
at: 25            # call 1 is the build-time trace: dies at the start of optimizer step 24 (distill step 8)
inner: {_target_: kdrun.data.mix.Mixup, num_classes: 10, alpha: 1.0}
"""


def kdrun(args, cwd):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "kdrun", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def epoch_rows(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keep = {}
    for r in rows:  # the last row of each (stage, step, kind): a resumed run repeats rows after its checkpoint
        if "loss/total" in r:
            r = {k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s", "peak_memory_mb")}  # measured, per process
            keep[(r["stage"], r["step"], "epoch_time_s" in r or "top1" in r)] = r
    return keep


def test_a_run_killed_mid_epoch_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    proc = kdrun([*ARGS, "batch_transform=mixup", f"hydra.run.dir={straight}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    conf = tmp_path / "conf" / "batch_transform"
    conf.mkdir(parents=True)
    (conf / "kill_mixup.yaml").write_text(KILL)
    split = tmp_path / "split"
    proc = kdrun([*ARGS, f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "batch_transform=kill_mixup",
                  f"hydra.run.dir={split}"], tmp_path)
    assert proc.returncode == -9, proc.stderr[-3000:]  # SIGKILL: no cleanup, no final checkpoint
    record = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["record"]
    # the distill stage's step-5 checkpoint: stage 2, epoch 1 unfinished, 5 of its 8 batches done
    assert (record["stage_index"], record["epoch"], record["batch"], record["step"]) == (1, 0, 5, 21)
    assert not (split / "student.pt").exists()

    # the killing transform replaced by the plain one: a changed config, so the checkpoint is named explicitly
    proc = kdrun([*ARGS, "batch_transform=mixup", f"resume={split}", f"hydra.run.dir={split}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("student.pt", "teacher.pt"):
        a = torch.load(straight / name, weights_only=True)["model"]
        b = torch.load(split / name, weights_only=True)["model"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert epoch_rows(straight) == epoch_rows(split)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (straight, split))
    assert (s1["steps"], s1["best_top1"], s1["last_top1"]) == (s2["steps"], s2["best_top1"], s2["last_top1"]) == (32, s1["best_top1"], s1["last_top1"])
