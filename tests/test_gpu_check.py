"""scripts/gpu_check.py, the project's GPU check, in its CPU dry run: every section runs through kdrun's public
engine API and fills its part of the table (so the check keeps working as the engine changes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # about a minute of subprocesses: deselect with -m 'not slow'

REPO = Path(__file__).resolve().parents[1]


def test_the_cpu_dry_run_runs_every_section_and_prints_the_table(tmp_path):
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--quick", "--device", "cpu", "--out", str(out),
                           "--limit-scale", "20", "--budget", "3000"], capture_output=True, text=True, timeout=1500,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((out / "status.json").read_text())
    assert list(status) == ["env", "tests_cuda", "quickstart", "syncs", "methods", "agreement", "throughput",
                            "determinism", "quickstart_fast"] and all(v["state"] == "ok" for v in status.values())
    syncs = json.loads((out / "syncs.json").read_text())["rows"]
    assert all("error" not in r and r["finite"] for r in syncs)
    kd_bf16 = syncs[0]
    assert kd_bf16["recipe"] == "cifar100_kd" and kd_bf16["sync_ops_per_step"] == 0  # no host read in kdrun's step
    methods = json.loads((out / "methods.json").read_text())["rows"]
    assert all("error" not in r and r["bf16_finite"] for r in methods)
    assert max(max(r["step0_rel_diff"].values()) for r in methods if "step0_rel_diff" in r) < 0.05
    agreement = json.loads((out / "agreement.json").read_text())
    assert agreement["default"]["finite"] and agreement["fast"]["finite"] and agreement["last50_rel_diff"] < 0.05
    throughput = json.loads((out / "throughput.json").read_text())["rows"]
    assert [r["batch"] for r in throughput] == [8, 16] and all(r["images_per_s"]["hand fast"] > 0 for r in throughput)
    determinism = json.loads((out / "determinism.json").read_text())["rows"]
    assert all("error" not in v for v in determinism.values())  # on the CPU every op has a deterministic kernel
    for name in ("quickstart", "quickstart_fast"):
        assert json.loads((out / f"{name}.json").read_text())["rc"] == 0
    text = (out / "report.txt").read_text()
    assert text in proc.stdout and "kdrun GPU check" in text and "throughput cnn_tiny -> cnn_tiny" in text
