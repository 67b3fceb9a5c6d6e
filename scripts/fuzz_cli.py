"""Feed kdrun bad command lines and count how each one ends (issue 15's fuzz).

Every line below is a mistake a user can make, over every config group: misspelt keys and options,
values of the wrong type or out of range, impossible combinations, missing or broken files. Each runs
as ``python -m kdrun LINE`` (with a tiny, quiet base so that a wrongly accepted line ends quickly) and is
classified:

- ``clean``: non-zero exit, no Python traceback, the message in at most a few lines;
- ``traceback``: a Python traceback reached the user;
- ``accepted``: exit 0, i.e. the mistake ran with some other meaning;
- ``noisy``: non-zero exit without traceback but a long message (Hydra's option listings).

Usage::

    python scripts/fuzz_cli.py [--jobs 2] [--only WORD] [--show]

Prints one row per line that was not clean and the totals; exit code 1 when any line was a traceback
or accepted.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
from pathlib import Path

BASE = ["trainer.progress=off", "trainer.tensorboard=false", "trainer.max_epochs=1", "data.subset=64"]
TEXT = ["+recipe=text_quickstart", "stages.teacher.max_steps=2", "stages.distill.max_steps=2"]


def bad_lines(tmp: Path) -> list[list[str]]:
    """The command lines (each a list of arguments) that must all be refused with one clear message."""
    empty, text, code = tmp / "empty.pt", tmp / "text.pt", tmp / "code.pt"
    empty.write_bytes(b"")
    text.write_text("not a checkpoint")
    import torch

    torch.save({"model": {"w": torch.zeros(2)}, "obj": Path("x")}, code)
    truncated = tmp / "cut.pt"
    torch.save({"model": {"w": torch.zeros(10000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    readonly = tmp / "ro"
    readonly.mkdir(exist_ok=True)
    readonly.chmod(0o555)
    lines: list[list[str]] = [
        # ---- top level
        ["seed=abc"], ["seed=-1"], ["seed=1e30"], ["seed=[1,2]"], ["seed=99999999999999999999999"],
        ["objective=best"], ["objective=probe_top1"], ["+nme=x"], ["resume=maybe"], [f"resume={tmp}/nothing"],
        [f"resume={empty}"], [f"resume={truncated}"], [f"resume={code}"], ["method=[a,b]"],
        # ---- recipe and groups
        ["+recipe=cifar100_kdd"], ["+recipe=nope"], ["student=cnn_tin"], ["teacher=resnet_32x4"],
        ["data=digit"], ["data=cifar1000"], ["trainer=fastest"], ["+batch_transform=mixupp"],
        ["model@models.peer=cnn_tin"], ["optim@stages.distill.optimizer=sgdd"], ["sched@stages.distill.scheduler=cosin"],
        ["+compare=alon"], ["-m", "student=cnn_tiny,cnn_nonexist"], ["-m", "trainer.max_epoch=1,2"],
        # ---- data
        ["data.subset=0"], ["data.subset=-10"], ["data.subset=abc"], ["data.subset=1.5"], ["data.batch_size=0"],
        ["data.batch_size=-4"], ["data.batch_size=abc"], ["data.eval_batch_size=0"], ["data.num_classes=5"],
        ["data.num_classes=-1"], ["data.num_classes=abc"], ["data.mean=[0.5,0.5]"], ["data.std=[0]"],
        ["data.std=[0.1,0.2,0.3]"], ["data.mean=0.5"], ["data.crop_padding=-2"], ["data.num_workers=-1"],
        ["data.val_split=0"], ["data.val_split=100000"], ["data.val_split=-5"], ["data.input_shape=[3,32,32]"],
        ["data.subst=10"], ["+data.subst=10"], ["data.drop_last=maybe"], ["data.hflip=2"],
        ["data.source.test_fraction=1.5"], ["data.source.test_fraction=0"], ["+data.source.nope=1"],
        ["data=cifar100", f"data.root={tmp}/none"], ["data=imagenet", f"data.root={tmp}/none"],
        ["data.batch_size=100000", "data.drop_last=true"], ["data.subset_seed=-1"], ["data.eval_mask=nope"],
        # ---- trainer
        ["trainer.max_epochs=0"], ["trainer.max_epochs=-1"], ["trainer.max_epochs=abc"], ["trainer.max_steps_per_epoch=0"],
        ["trainer.max_steps_per_epoch=-3"], ["trainer.log_every=0"], ["trainer.log_every=-5"], ["trainer.eval_every=0"],
        ["trainer.save_every=0"], ["trainer.save_every_steps=0"], ["trainer.eval_every_steps=-1"],
        ["trainer.accumulate_grad_batches=0"], ["trainer.precision=fp8"], ["trainer.precision=16"],
        ["trainer.device=tpu"], ["trainer.device=cuda:7"], ["trainer.progress=maybe"], ["trainer.compile_mode=fastest"],
        ["trainer.gradient_clip_norm=0"], ["trainer.gradient_clip_norm=-1"], ["trainer.deterministic=2"],
        ["trainer.max_epoch=2"], ["trainer.dist_timeout_s=0"], ["trainer.fsdp=true"],
        ["trainer.compile_backend=nope", "trainer.compile=true"], ["trainer.log_every=[1]"],
        # ---- models
        ["teacher.checkpoint=/no/such/file.pt"], [f"teacher.checkpoint={empty}"], [f"teacher.checkpoint={text}"],
        [f"teacher.checkpoint={code}"], [f"teacher.checkpoint={truncated}"], ["teacher.dtype=float8"],
        ["teacher.init_from=teacher"], ["student.init_from=nobody"], ["student.init_noise=-1"],
        ["teacher.net.width=-3"], ["+teacher.net.nope=1"], ["student.net._target_=kdrun.models.simple.nope"],
        ["student.net._target_=nope.module.x"], ["+student.taps.feat=no.such.module"], ["student.inputs={x: input}"],
        ["student.outputs=[a]"], ["+models.batch={net: {_target_: x}}"], ["teacher.strict=maybe"],
        ["student.net.num_classes=3"], ["student.net.in_channels=3"],
        # ---- loss terms
        ["loss.kd.weight=-1"], ["loss.kd.weight=abc"], ["loss.kd.weight=1e40"], ["loss.kd.temperature=-1"],
        ["loss.kd.temperature=0"], ["loss.kd.temperature=abc"], ["+loss.kd.temprature=2"], ["loss.kd.warmup_epochs=-3"],
        ["loss.kd.inputs.student=student.nope"], ["loss.kd.inputs.student=nobody.logits"], ["loss.kd.inputs.nope=student.logits"],
        ["loss.kd.inputs.student=logits"], ["loss.kd._target_=kdrun.losses.NoLoss"], ["~loss.kd"], ["loss.kd=null"],
        ["+loss.x={_target_: kdrun.losses.KDLoss}"], ["stages.distill.losses=[ce,nope]"], ["stages.distill.losses=[]"],
        ["loss.kd.weight=[1,2]"], ["loss.ce.weight=null"],
        # ---- stages
        ["stages.distill.epochs=0"], ["stages.distill.epochs=-2"], ["stages.distill.epochs=abc"],
        ["stages.distill.max_steps=0"], ["stages.distill.train=[nobody]"], ["stages.distill.train=student"],
        ["stages.distill.eval=nobody"], ["stages.distill.scheduler_interval=batch"], ["+stages.distill.nope=1"],
        ["stages.distill.optimizer.lr=-0.1"], ["stages.distill.optimizer.lr=1e40"], ["stages.distill.optimizer.lr=abc"],
        ["stages.distill.optimizer.momentum=-1"], ["stages.distill.optimizer.weight_decay=-1"],
        ["stages.distill.optimizer._target_=torch.optim.Nope"], ["+stages.distill.optimizer.nope=1"],
        ["stages.distill.epochs=null"], ["stages=null"], ["stages.teacher.order=abc"],
        ["sched@stages.distill.scheduler=multistep", "stages.distill.scheduler.milestones=abc"],
        ["sched@stages.distill.scheduler=multistep", "stages.distill.scheduler.gamma=-1"],
        ["sched@stages.distill.scheduler=warmup_cosine", "stages.distill.scheduler.warmup_steps=-5"],
        ["+stages.distill.co_train.peer.train=[nobody]", "+stages.distill.co_train.peer.losses=[kd]"],
        # ---- transforms, rounds, probe, generation, published
        ["+batch_transform=mixup", "batch_transform.alpha=-1"], ["+batch_transform=cutmix", "batch_transform.alpha=0"],
        ["+rounds.count=0"], ["+rounds.count=2", "+rounds.student=nobody"], ["+rounds.count=2", "+rounds.weights.kd=[1]"],
        ["+probe.models=[nobody]"], ["+probe.epochs=0"], ["+probe.lr=-1", "+probe.models=[student]"],
        ["+generation.models=[student]"], ["+published.metric=middle", "+published.source=x"],
        # ---- files and folders
        # (a chmod'ed folder stops no one running as root; /proc refuses everyone)
        *([[f"hydra.run.dir={readonly}/run"]] if os.geteuid() != 0 else []),
        ["hydra.run.dir=/proc/kdrun/run"], ["hydra.run.dir=/sys/kdrun"], ["-m", "hydra.sweep.dir=/proc/kdrun"],
        [f"hydra.run.dir={tmp}/{'x' * 300}"], [f"name={'n' * 300}"],
        # ---- text path
        [*TEXT, "data.source.block_size=0"], [*TEXT, "data.source.block_size=-8"], [*TEXT, "loss.kd.divergence=nope"],
        [*TEXT, "loss.kd.top_k=0"], [*TEXT, "loss.kd.top_k=-1"], [*TEXT, "loss.kd.chunk_size=0"],
        [*TEXT, "loss.kd.temperature=0"], [*TEXT, "data.source.tokenizer.vocab_size=1"],
        [*TEXT, "+student.net.config_overrides.hidden_size=-1"], [*TEXT, "+generation.max_new_tokens=0"],
        [*TEXT, "student.net.dtype=float7"], [*TEXT, "loss.kd.teacher_mix=2"],
    ]
    return lines


def classify(args: list[str], cwd: Path, timeout: int) -> tuple[str, int, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    full = [*args] if args and args[0] == "-m" else [*args]
    base = [a for a in BASE if not any(x.startswith(a.split("=")[0] + "=") for x in args)]
    cmd = [sys.executable, "-m", "kdrun", *full, *base]
    if not any(a.startswith("hydra.run.dir=") for a in args):
        cmd.append(f"hydra.run.dir={cwd}/runs/{abs(hash(tuple(args)))}")
    if args and args[0] == "-m":
        cmd.append(f"hydra.sweep.dir={cwd}/sweeps/{abs(hash(tuple(args)))}")
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", -1, ""
    err = proc.stderr.strip()
    if "Traceback (most recent call last)" in proc.stderr or "Error executing job" in proc.stderr:
        kind = "traceback"
    elif proc.returncode == 0:
        kind = "accepted"
    else:
        lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("[")]
        kind = "clean" if len(lines) <= 3 else "noisy"
    last = [ln for ln in err.splitlines() if ln.strip()] or proc.stdout.strip().splitlines() or [""]
    return kind, proc.returncode, last[-1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--timeout", type=int, default=180)
    p.add_argument("--only", help="run only the lines containing this text")
    p.add_argument("--show", action="store_true", help="print every line's last message, clean ones too")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        lines = bad_lines(tmp)
        if args.only:
            lines = [ln for ln in lines if any(args.only in a for a in ln)]
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            results = list(pool.map(lambda ln: classify(ln, tmp, args.timeout), lines))
        (tmp / "ro").chmod(0o755)
    counts: dict[str, int] = {}
    for ln, (kind, code, msg) in zip(lines, results):
        counts[kind] = counts.get(kind, 0) + 1
        if kind != "clean" or args.show:
            print(f"{kind:9} rc={code:<4} {' '.join(ln)[:90]:90} | {msg[:200]}")
    print(f"\n{len(lines)} bad command lines: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    return 1 if counts.get("traceback") or counts.get("accepted") else 0


if __name__ == "__main__":
    raise SystemExit(main())
