"""SIGKILL a run at random moments, resume it each time, and check that nothing was lost (issue 15).

The run (the digits quickstart, lengthened, with a checkpoint every few steps) is started, killed with
SIGKILL after a random delay (during start-up, training, evaluation or a checkpoint write), and started
again with ``resume=auto`` until ``--kills`` kills have landed; then it runs to the end. Checked against
an uninterrupted run of the same config:

- every checkpoint left by a kill loads (no corrupt file), and no partial ``*.tmp`` file survives a resume;
- the exported student is bit-identical;
- ``metrics.jsonl`` has exactly the uninterrupted run's rows (none twice, none lost; timings aside).

Usage::

    python scripts/kill_loop.py [--kills 30] [--seed 0] [--min-delay 3] [--max-delay 9] [--epochs 250]

Prints one line per kill and a summary; exit code 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARGS = ["stages.teacher.epochs=4", "trainer.save_every_steps=3", "trainer.log_every=5", "trainer.progress=off",
        "trainer.tensorboard=false"]
MEASURED = ("epoch_time_s", "images_per_s", "tokens_per_s", "peak_memory_mb")


def kdrun(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([sys.executable, "-m", "kdrun", *args], cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [{k: v for k, v in json.loads(line).items() if k not in MEASURED} for line in open(path)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-delay", type=float, default=3.0)
    p.add_argument("--max-delay", type=float, default=9.0)
    p.add_argument("--epochs", type=int, default=250, help="distillation epochs (long enough to absorb every kill)")
    args = p.parse_args()
    base = [*ARGS, f"stages.distill.epochs={args.epochs}"]
    import torch

    rng = random.Random(args.seed)
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        whole, run = tmp / "whole", tmp / "killed"
        t0 = time.time()
        ref = kdrun([*base, f"hydra.run.dir={whole}"], tmp)
        _, err = ref.communicate()
        if ref.returncode != 0:
            print(err[-3000:])
            return 1
        print(f"uninterrupted run: {time.time() - t0:.1f} s")
        kills = starts = 0
        while True:
            starts += 1
            proc = kdrun([*base, f"hydra.run.dir={run}", "resume=auto"], tmp)
            if kills < args.kills:
                delay = rng.uniform(args.min_delay, args.max_delay)
                try:
                    proc.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    last = run / "checkpoints" / "last.pt"
                    state = None
                    if last.is_file():
                        try:
                            state = torch.load(last, weights_only=True)
                        except Exception as ex:  # a corrupt checkpoint is a failure
                            problems.append(f"kill {kills}: last.pt does not load: {ex}")
                    tmps = sorted(x.name for x in run.rglob("*.tmp"))
                    where = ("no checkpoint yet" if state is None else
                             f"checkpoint at step {state['record']['step']} (stage {state['record']['stage_index']}, "
                             f"epoch {state['record']['epoch']}, batch {state['record']['batch']})")
                    print(f"kill {kills:2d} after {delay:.2f} s: {where}; partial files left: {tmps or 'none'}")
                    continue
            _, err = proc.communicate()
            if proc.returncode != 0:
                problems.append(f"start {starts}: exit {proc.returncode}: {err.strip().splitlines()[-1:]}")
                break
            if not (run / "summary.json").is_file():
                problems.append(f"start {starts}: exit 0 without summary.json")
            break
        leftovers = sorted(str(x.relative_to(run)) for x in run.rglob("*.tmp"))
        if leftovers:
            problems.append(f"partial files after the final resume: {leftovers}")
        a = torch.load(whole / "student.pt", weights_only=True)["model"]
        b = torch.load(run / "student.pt", weights_only=True)["model"] if (run / "student.pt").is_file() else {}
        same = bool(b) and all(torch.equal(a[k], b[k]) for k in a)
        if not same:
            problems.append("the exported student differs from the uninterrupted run's")
        ra, rb = rows(whole), rows(run)
        if ra != rb:
            dup = len(rb) - len({json.dumps(r, sort_keys=True) for r in rb})
            problems.append(f"metrics.jsonl: {len(rb)} rows vs {len(ra)} uninterrupted ({dup} duplicated)")
    print(f"\n{kills} kills, {starts} starts; student bit-exact: {same}; metrics rows identical: {ra == rb} "
          f"({len(rb)} rows); partial files left: {len(leftovers)}")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
