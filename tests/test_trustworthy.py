"""Runs that can be trusted: out-of-range input refused before training, smoke runs marked, non-finite
values stopped before they reach a checkpoint, interruptions that save and say how to resume, failure
records, one run per directory (issue 15)."""
from __future__ import annotations

import json
import os
import re
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
    ("method=[a,b]", "method must be a string or null"),
    ("name=" + "n" * 300, "name is part of the run directory's path"),
    ("data.hflip=2", "'data.hflip': it is true or false, got 2"),
    ("trainer.compile_mode=fastest", "trainer.compile_mode must be one of"),
    ("+student.taps.feat=no.such.module", "student.taps.feat: SimpleCNN has no module 'no.such.module'"),
    ("student.outputs=[a]", "returns one tensor"),
    ("sched@stages.distill.scheduler=multistep stages.distill.scheduler.milestones=abc", "milestones must be a list"),
    ("sched@stages.distill.scheduler=multistep stages.distill.scheduler.gamma=-1", "gamma must be positive"),
    ("sched@stages.distill.scheduler=warmup_cosine stages.distill.scheduler.warmup_steps=-500 "
     "stages.distill.scheduler_interval=step stages.distill.max_steps=50",
     "stages.distill.scheduler: schedule: need warmup_steps >= 0"),
    ("stages.distill.scheduler=null +stages.distill.scheduler={_target_:torch.optim.lr_scheduler.PolynomialLR,total_iters:5,power:-1.0}",
     "stages.distill.scheduler (total_iters=5, power=-1.0): "),
])
def test_out_of_range_values_are_errors_before_training(override, words):
    with pytest.raises(KdrunError) as info:
        check(override.split(" "))
    assert words in str(info.value)


def test_command_line_checks_before_hydra_starts(tmp_path):
    from kdrun.cli import check_group_choices, check_paths

    assert check_group_choices(["student=cnn_tin"]).startswith("no student 'cnn_tin'. Did you mean 'cnn_tiny'?")
    assert "Did you mean 'cifar100_kd'?" in check_group_choices(["+recipe=cifar100_kdd"])
    assert "no model 'cnn_tin'" in check_group_choices(["model@models.peer=cnn_tin"])
    assert "no student 'nope'" in check_group_choices(["-m", "student=cnn_tiny,nope"])
    assert check_group_choices(["student=cnn_tiny", "data=digits", "teacher=null", "data.subset=3"]) is None
    assert check_group_choices(["hydra.searchpath=[file:///x]", "+recipe=mine"]) is None  # a user folder may add it
    assert "cannot create or write this directory" in check_paths(["hydra.run.dir=/proc/kdrun/run"])
    assert "too long for the file system" in check_paths([f"hydra.run.dir={tmp_path}/{'x' * 300}"])
    assert check_paths([f"hydra.run.dir={tmp_path}/ok", "name=fine"]) is None


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


# ------------------------------------------------------------------------------ bad checkpoint files

def test_bad_checkpoint_files_get_one_message(tmp_path):
    from kdrun.engine.checkpoint import read_tensors_file

    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, good)
    empty, cut, code = tmp_path / "empty.pt", tmp_path / "cut.pt", tmp_path / "code.pt"
    empty.write_bytes(b"")
    cut.write_bytes(good.read_bytes()[:600])
    torch.save({"model": {"w": torch.zeros(2)}, "note": Path("x")}, code)  # a pickled object beyond tensors
    for path, words in ((empty, "is empty"), (cut, "is truncated or corrupt"), (code, "holds Python objects besides tensors")):
        with pytest.raises(KdrunError, match=words) as info:
            read_tensors_file(path, "teacher.checkpoint")
        assert "weights_only=False" not in str(info.value) and str(info.value).startswith("teacher.checkpoint: ")


def test_a_non_strict_load_of_the_wrong_file_is_a_random_teacher(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"unrelated.weight": torch.zeros(3)}}, wrong)
    exp = build(validate(compose_cfg(["stages.teacher.epochs=1", f"teacher.checkpoint={wrong}", "teacher.strict=false",
                                      "~stages.teacher", *SMALL])))
    assert exp.random_models == ["teacher"]


def test_a_failed_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    from kdrun.engine import checkpoint

    target = tmp_path / "last.pt"
    checkpoint.atomic_save({"v": torch.ones(1)}, target)

    def full(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(KdrunError, match=f"cannot write {target}: the disk is full"):
        checkpoint.atomic_save({"v": torch.zeros(1)}, target)
    monkeypatch.undo()
    assert torch.load(target)["v"].item() == 1.0 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_leftover_partial_writes_are_removed_at_start(tmp_path):
    from kdrun.engine.trainer import Trainer

    (tmp_path / "checkpoints").mkdir()
    junk = [tmp_path / "checkpoints" / ".last.pt.abc123.tmp", tmp_path / ".student.pt.x9.tmp"]
    for j in junk:
        j.write_bytes(b"x" * 100)
    keep = tmp_path / "notes.tmp"
    keep.write_text("mine")
    Trainer(validate(compose_cfg(SMALL)), tmp_path).prepare()
    assert not any(j.exists() for j in junk) and keep.exists()


# ---------------------------------------------------------------------------------- one run per folder

def test_a_second_run_in_a_busy_directory_is_refused(tmp_path):
    from kdrun.engine.runlock import LOCK_NAME, RunLock, lock_owner

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid, "started": 0}))
        assert lock_owner(tmp_path)["pid"] == sleeper.pid
        with pytest.raises(KdrunError, match="is in use by another kdrun run"):
            RunLock(tmp_path).acquire()
        proc = run_cli([f"hydra.run.dir={tmp_path}", *SMALL], tmp_path)
        assert proc.returncode == 2 and "is in use by another kdrun run" in proc.stderr
        assert not (tmp_path / ".hydra").exists()  # refused before Hydra wrote into it
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = RunLock(tmp_path)  # the owner is gone: a stale lock is taken over
    lock.acquire()
    assert lock_owner(tmp_path) is None and json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


# ------------------------------------------------------------------------------- resume semantics

def test_resume_overrides_reuse_the_runs_own_and_refuse_conflicts(tmp_path):
    from kdrun.cli import resume_overrides

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- +recipe=quickstart\n- data.subset=128\n- hydra.run.dir=x\n")
    d = f"hydra.run.dir={tmp_path}"
    assert resume_overrides([d, "resume=auto"]) == ["+recipe=quickstart", "data.subset=128", d, "resume=auto"]
    assert resume_overrides([d, "resume=auto", "data.subset=128", "trainer.progress=off"]) == [
        "+recipe=quickstart", "data.subset=128", d, "resume=auto", "trainer.progress=off"]
    with pytest.raises(KdrunError, match=r"data.subset=64 \(the run had data.subset=128\), seed=2 \(not set in the run\)"):
        resume_overrides([d, "resume=auto", "data.subset=64", "seed=2"])
    assert resume_overrides([f"hydra.run.dir={tmp_path / 'new'}", "resume=auto"]) is None
    assert resume_overrides([d, f"resume={tmp_path}", "seed=2"]) is None  # an explicit checkpoint: as given
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- data.subset=64\n- data.subset=128\n")
    assert resume_overrides([d, "resume=auto", "data.subset=32", "data.subset=128"]) is not None  # the last one counts


@pytest.mark.slow
def test_resume_auto_without_a_checkpoint_says_so_and_an_explicit_one_is_an_error(tmp_path):
    proc = run_cli(["resume=auto", f"hydra.run.dir={tmp_path / 'a'}", "trainer.max_epochs=1", *SMALL], tmp_path)
    assert proc.returncode == 0 and "STARTS FROM SCRATCH" in proc.stderr + proc.stdout
    proc = run_cli([f"resume={tmp_path / 'nothing'}", *SMALL], tmp_path)
    assert proc.returncode == 2 and "no checkpoint at" in proc.stderr


# ----------------------------------------------------------------------------------- interruption

def _start(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    full = {**os.environ, **(env or {})}
    full.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "kdrun", *args], cwd=cwd, env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for_rows(run: Path, rows: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    metrics = run / "metrics.jsonl"
    end = time.time() + timeout
    while time.time() < end:
        if metrics.is_file() and sum(1 for _ in open(metrics)) >= rows:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("the run never got there")


LONG = ["stages.teacher.epochs=2", "stages.distill.epochs=3", "trainer.log_every=1", "data.subset=256",
        "data.batch_size=32", *QUIET]


def _interrupt(run: Path, cwd: Path, sig: int, code: int) -> None:
    """Start the LONG run in ``run``, send ``sig`` inside the distill stage, check how it stopped."""
    proc = _start([*LONG, f"hydra.run.dir={run}"], cwd)
    _wait_for_rows(run, 20, proc)  # inside the distill stage
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err and f"resume with: kdrun hydra.run.dir={run} resume=auto" in err
    assert f"stopped by {signal.Signals(sig).name} in stage 'distill'" in err
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    # the checkpoint is the one written at the stop: mid-epoch, or at an epoch's end when the signal came in its last step
    stopped_at = int(re.search(r"\(run step (\d+)\)", err).group(1))
    assert state["record"]["step"] == stopped_at and state["record"]["stage_index"] == 1
    assert not (run / ".kdrun.lock").exists()


@pytest.mark.slow
def test_ctrl_c_saves_mid_epoch_and_exits_130_without_a_traceback(tmp_path):
    _interrupt(tmp_path / "cut", tmp_path, signal.SIGINT, 130)


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_says_how_to_resume_and_the_resumed_run_is_exact(tmp_path):
    whole = run_cli([*LONG, f"hydra.run.dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "cut"
    _interrupt(run, tmp_path, signal.SIGTERM, 143)
    again = run_cli([f"hydra.run.dir={run}", "resume=auto"], tmp_path)  # the run's own overrides are reused
    assert again.returncode == 0, again.stderr[-2000:]
    a = torch.load(tmp_path / "whole" / "student.pt", weights_only=True)["model"]
    b = torch.load(run / "student.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    measured = ("epoch_time_s", "images_per_s", "tokens_per_s", "peak_memory_mb")  # timings and memory differ

    def rows(d: Path) -> list[dict]:
        return [{k: v for k, v in json.loads(x).items() if k not in measured} for x in open(d / "metrics.jsonl")]

    assert rows(run) == rows(tmp_path / "whole")  # no row twice, none lost


@pytest.mark.slow
def test_sigusr1_in_a_slurm_job_requeues_it_and_the_requeued_job_resumes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    fake = bin_dir / "scontrol"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\n")
    fake.chmod(0o755)
    env = {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    run = tmp_path / "job"
    proc = _start([*LONG, f"hydra.run.dir={run}"], tmp_path, env)
    _wait_for_rows(run, 20, proc)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGUSR1 and log.read_text().split() == ["requeue", "4242"], err[-2000:]
    # SLURM starts the same command again, with SLURM_RESTART_COUNT set: it continues by itself
    again = _start([*LONG, f"hydra.run.dir={run}"], tmp_path, {**env, "SLURM_RESTART_COUNT": "1"})
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0 and "resuming from" in err + out and (run / "student.pt").is_file(), err[-2000:]


@pytest.mark.slow
def test_a_failed_single_run_leaves_its_error_in_the_log_and_a_failed_file(tmp_path):
    run = tmp_path / "run"
    proc = run_cli(["loss.kd.temperature=-1", f"hydra.run.dir={run}", *SMALL], tmp_path)
    assert proc.returncode == 2 and "temperature must be positive" in proc.stderr
    assert "temperature must be positive" in (run / "FAILED").read_text()
    assert "temperature must be positive" in (run / "kdrun.log").read_text()
