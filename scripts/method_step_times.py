#!/usr/bin/env python
"""Time one training step of every method recipe on the same models and data, relative to plain KD.

    python scripts/method_step_times.py --teacher resnet56 --student resnet20 --batch-size 64 --device cpu
    python scripts/method_step_times.py --recipes cifar100_kd cifar100_crd --json times.json

Each recipe is built as `kdrun +recipe=NAME teacher=T student=S data=synthetic data.num_classes=100
teacher.checkpoint=null` would build it, and its last stage's real training step (teacher forward,
student forward, adapters, loss terms, backward, optimizer step, loss accumulation) is timed with the
engine's own `StageRunner.train_step` (batch transforms, co-trained models with their own backward
passes and optimizers, and routers included). A DML peer is the student's architecture; every other
named model keeps its recipe's architecture with random weights. Recipes are measured in interleaved rounds (every recipe once per round) and
the median time per step is reported, so slow phases of a shared machine hit all recipes alike.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from kdrun.config import validate  # noqa: E402
from kdrun.engine.stage import StageRunner  # noqa: E402
from kdrun.engine.trainer import Trainer  # noqa: E402
from kdrun.paths import config_dir, recipe_dir  # noqa: E402
from kdrun.registry import register_configs  # noqa: E402

SKIP = {"quickstart", "cifar100_baseline", "cifar100_kd_optuna", "cifar100_trg_sweep", "cifar100_trg_vit",
        "cifar100lt_kd", "cifar100lt_trg"}


def make_runner(recipe: str, args: argparse.Namespace) -> tuple[StageRunner, list[dict]]:
    overrides = [f"+recipe={recipe}", "data=synthetic", "data.num_classes=100", f"data.batch_size={args.batch_size}",
                 f"data.source.num_train={args.batch_size * 4}", "data.source.num_test=64", "teacher.checkpoint=null",
                 f"teacher={args.teacher}", f"student={args.student}", f"trainer.device={args.device}",
                 "trainer.progress=off", "trainer.tensorboard=false", "trainer.save_checkpoints=false"]
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        models = compose("kdrun", overrides=overrides).get("models") or {}
        # more named models: random weights; a DML peer is the student's architecture
        overrides += [f"models.{name}.checkpoint=null" for name in models]
        overrides += [f"model@models.peer={args.student}"] if "peer" in models else []
        cfg = validate(compose("kdrun", overrides=overrides))
    trainer = Trainer(cfg, tempfile.mkdtemp(prefix="kdrun-steps-"))
    experiment = trainer.prepare()
    runner = trainer.stage_runner(len(experiment.stages) - 1)
    runner.set_modes()
    train_loader = trainer.ctx.train_loader
    train_loader.set_epoch(0)
    batches = list(train_loader)
    return runner, batches


def time_steps(runner: StageRunner, batches: list[dict], steps: int, device: torch.device) -> float:
    weights = runner.term_weights(0)
    acc = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for i in range(steps):
        batch = batches[i % len(batches)]
        total, values = runner.train_step(batch, weights)
        vec = torch.stack([total.detach().float(), *(v.float() for v in values.values())])
        acc = vec if acc is None else acc + vec
    acc.tolist()  # one read, as the engine does per logging interval
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="*")
    parser.add_argument("--teacher", default="resnet56")
    parser.add_argument("--student", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    recipes = args.recipes or sorted(p.stem for p in recipe_dir().glob("cifar100_*.yaml") if p.stem not in SKIP)
    if "cifar100_kd" not in recipes:
        recipes.insert(0, "cifar100_kd")
    runners = {r: make_runner(r, args) for r in recipes}
    device = torch.device(args.device)
    for r, (runner, batches) in runners.items():  # warm-up
        time_steps(runner, batches, 2, device)
    times: dict[str, list[float]] = {r: [] for r in recipes}
    for _ in range(args.rounds):
        for r, (runner, batches) in runners.items():
            times[r].append(time_steps(runner, batches, args.steps, device))
    kd = statistics.median(times["cifar100_kd"])
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    print(f"# step time per method: {args.teacher} -> {args.student}, batch {args.batch_size}, {args.device} "
          f"({cpu}, {torch.get_num_threads()} threads), torch {torch.__version__}, median of {args.rounds} rounds x {args.steps} steps")
    print("| recipe | ms / step | vs KD |\n| --- | ---: | ---: |")
    rows = []
    for r in recipes:
        t = statistics.median(times[r])
        rows.append({"recipe": r, "ms_per_step": 1000 * t, "vs_kd": t / kd})
        print(f"| {r} | {1000 * t:.1f} | {t / kd:.2f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "cpu": cpu, "torch": torch.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
