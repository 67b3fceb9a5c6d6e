"""scripts/benchmark.py runs end to end with tiny settings and writes valid JSON (no timing assertions)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
import pytest

pytestmark = pytest.mark.slow  # subprocesses: deselect with -m 'not slow'

REPO = Path(__file__).resolve().parents[1]


def test_benchmark_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", "cpu", "--teacher", "cnn_tiny",
           "--student", "cnn_tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--rounds", "2",
           "--memory-steps", "1", "--threads", "1", "--quiet", "--kdrun-override=trainer.tensorboard=false",
           "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())

    assert res["machine"]["device"] == "cpu" and res["machine"]["threads"] == 1
    assert res["settings"]["teacher"] == "cnn_tiny" and res["settings"]["steps"] == 2
    sides = {s["side"]: s for s in res["overhead"]["sides"]}
    assert set(sides) == {"kdrun", "hand"}
    for s in sides.values():
        assert len(s["ms_per_step_rounds"]) == 2 and s["ms_per_step"] > 0 and s["images_per_s"] > 0
        assert s["memory"]["kind"].startswith(("VmHWM", "ru_maxrss")) and s["memory"]["peak_mib"] > 0
    ratio = res["overhead"]["ratio_kdrun_over_hand"]
    assert len(ratio["per_round"]) == 2 and ratio["min"] <= ratio["median"] <= ratio["max"]
    assert "skipped" in res["presets"]  # CPU: the fast preset needs a GPU
    assert "skipped" in res["torchdistill"] or res["torchdistill"]["sides"]
    assert "framework overhead" in proc.stdout and res["table"] in proc.stdout


def test_presets_dry_run_on_the_cpu_compares_kdrun_fast_with_the_hand_written_fast_loop(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", "cpu", "--only", "presets", "--presets-on-cpu",
           "--teacher", "cnn_tiny", "--student", "cnn_tiny", "--batch-size", "8", "--large-batch", "16", "--steps", "2",
           "--warmup", "1", "--rounds", "2", "--memory-steps", "0", "--threads", "1", "--quiet", "--compile-backend", "eager",
           "--kdrun-override=trainer.compile_backend=eager", "--kdrun-override=trainer.tensorboard=false", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["presets"]["rows"]
    assert [r["batch"] for r in rows] == [8, 16]
    for r in rows:
        sides = {s["side"]: s for s in r["sides"]}
        assert set(sides) == {"kdrun", "kdrun fast", "hand", "hand fast"}
        assert sides["kdrun fast"]["precision"] == sides["hand fast"]["precision"] == "bf16"
        assert r["kdrun_fast_speed_over_hand_fast"]["median"] > 0 and r["cifar100_240_epochs_min"] > 0
    assert "the speed of the hand-written loop with the same optimisations" in proc.stdout
