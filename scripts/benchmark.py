#!/usr/bin/env python
"""kdrun's speed benchmark: training throughput and peak memory, side by side in one run.

Three comparisons (docs/performance.md explains each and records measured tables):

1. ``overhead``     kdrun's real training step (``StageRunner.train_epoch``: batch from the
                    ArrayLoader, ``train_step``: forward, backward, optimizer step; on-device loss
                    accumulation and the periodic metrics flush) against a minimal hand-written
                    PyTorch KD loop doing the same arithmetic on the same device-resident data.
                    The ratio kdrun / hand is the framework overhead (target <= 1.03).
2. ``presets``      ``trainer=fast`` (bf16, channels_last, torch.compile, fused SGD) against
                    ``trainer=default`` (fp32, eager), and both against the hand-written loop plain
                    (``hand``) and with the same optimisations (``hand fast``), at batch 64 and a large
                    batch; GPU only (``--presets-on-cpu`` for a dry run).
3. ``torchdistill``  kdrun against torchdistill's ``DistillationBox`` with the same KD setting,
                    when torchdistill is importable (it is never a kdrun dependency).

Timing. Every side runs "rounds" of ``--steps`` steps after ``--warmup`` warm-up steps; the sides
alternate (the order rotates every round) so that slow drifts of the machine hit both alike. A
side's time per step in a round is the wall time of its whole window of steps divided by the
number of steps, so periodic costs (kdrun's metrics flush every ``trainer.log_every`` steps) are
included; the reported value is the median over rounds, and the median of the single steps is
shown too. Steps are delimited by the moment the loop asks for its next batch, so a step includes
building its batch. On CUDA the window is measured with CUDA events recorded at those moments and a
synchronisation at the start and end of a round only (no per-step synchronisation).

Memory. Each side is measured in a fresh subprocess that builds only that side and trains
``--warmup`` + ``--memory-steps`` steps. CUDA: ``torch.cuda.max_memory_allocated`` (peak, and peak
minus what was allocated when training started). CPU: the kernel's peak resident set size of the
process, the counter behind ``getrusage(RUSAGE_SELF).ru_maxrss``, read as ``VmHWM`` from
/proc/self/status after resetting it at the start of training (``/proc/self/clear_refs``), and its
growth over the resident set size at that moment: the memory training adds (activations, gradients,
optimizer state, allocator caches) on top of models and data. ``ru_maxrss`` itself is not used where
/proc exists: it cannot be reset and, in a child process, starts from the parent's resident set
size at fork time. Elsewhere ``ru_maxrss`` (process lifetime peak) is reported and named as such.

Usage:
    python scripts/benchmark.py                       # every comparison this machine can run
    python scripts/benchmark.py --only overhead --steps 40 --rounds 7 --json bench.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

CIFAR_TRAIN = 50_000
KD = dict(ce_weight=0.1, kd_weight=0.9, temperature=4.0, lr=0.05, momentum=0.9, weight_decay=5e-4,
          crop_padding=4, hflip=True, num_classes=100)
DEFAULTS = {  # device type -> teacher, student, steps, warmup
    "cpu": dict(teacher="resnet56", student="resnet20", steps=20, warmup=5),
    "cuda": dict(teacher="resnet32x4", student="resnet8x4", steps=100, warmup=30),
}


# ---------------------------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    info = {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device.type, "threads": threads}
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = "cpu"
    return info


def proc_status_kib() -> dict[str, int] | None:
    """VmRSS (resident set size now) and VmHWM (its high-water mark) in KiB from /proc/self/status (Linux)."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out if len(out) == 2 else None


def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS high-water mark (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def maxrss_kib() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


# ---------------------------------------------------------------------------------------------- timing
class Clock:
    """Marks the start of every step; per-step durations without per-step synchronisation."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.times: list[float] = []
        self.events: list[Any] = []

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.times, self.events = [], []

    def tick(self) -> None:
        self.times.append(time.perf_counter())
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.events.append(ev)

    def durations(self) -> list[float]:
        """Seconds between consecutive ticks (``len(ticks) - 1`` values)."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000.0 for a, b in zip(self.events, self.events[1:])]
        return [b - a for a, b in zip(self.times, self.times[1:])]


class TimedLoader:
    """Wraps kdrun's train loader: ticks the clock each time the training loop asks for a batch
    (and once more when the epoch ends), so tick i -> i+1 is step i including its batch."""

    def __init__(self, inner: Any, clock: Clock) -> None:
        self.inner, self.clock = inner, clock

    def __len__(self) -> int:
        return len(self.inner)

    def set_epoch(self, key: int, start: int = 0) -> None:
        self.inner.set_epoch(key, start)

    def rank_sizes(self, i: int) -> list[int]:
        return self.inner.rank_sizes(i)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        it = iter(self.inner)
        while True:
            self.clock.tick()
            try:
                batch = next(it)
            except StopIteration:
                return
            yield batch


# ---------------------------------------------------------------------------------------------- config
def compose(overrides: list[str], recipe: str = "cifar100_kd"):
    """The config ``kdrun +recipe=<recipe> <overrides>`` would run."""
    from kdrun.registry import compose_config

    return compose_config(overrides, recipe)


def kdrun_overrides(teacher: str, student: str, batch: int, num_train: int, device: torch.device,
                    trainer: str = "default", extra: list[str] = ()) -> list[str]:
    return [
        f"trainer={trainer}", f"teacher={teacher}", f"student={student}", "teacher.checkpoint=null",
        "data=synthetic", f"data.num_classes={KD['num_classes']}", f"data.batch_size={batch}",
        f"data.crop_padding={KD['crop_padding']}", f"data.hflip={str(KD['hflip']).lower()}", "data.drop_last=true",
        f"data.source.num_train={num_train}", f"data.source.num_test={batch}",
        f"trainer.device={device.type}", "trainer.progress=off", *extra,
    ]


# ---------------------------------------------------------------------------------------------- sides
class Side:
    """One training loop under test: ``epoch(key, steps)`` runs ``steps`` steps, ticking ``clock``."""

    name: str
    clock: Clock
    batch: int

    def epoch(self, key: int, steps: int) -> None:
        raise NotImplementedError


class KdrunSide(Side):
    """kdrun's own step through its public engine API: ``Trainer.prepare()`` (seed, build,
    channels_last, compile, loaders, the real metrics writer: metrics.jsonl + TensorBoard as configured,
    in a temporary run directory), then ``StageRunner.train_epoch`` exactly as ``StageRunner.run``
    calls it."""

    def __init__(self, name: str, overrides: list[str], device: torch.device) -> None:
        from kdrun.config import validate
        from kdrun.engine.trainer import Trainer

        self.name = name
        cfg = validate(compose(overrides))
        self.cfg = cfg
        self.tmp = tempfile.TemporaryDirectory(prefix="kdrun-bench-")
        self.trainer = Trainer(cfg, Path(self.tmp.name))
        self.pipe = self.trainer.prepare()
        self.loader = self.trainer.ctx.train_loader
        self.batch = int(cfg.data.batch_size)
        self.clock = Clock(self.pipe.device)
        self.trainer.ctx.train_loader = TimedLoader(self.loader, self.clock)
        self.runner = self.trainer.stage_runner(0)
        self.precision = str(cfg.trainer.precision)

    def epoch(self, key: int, steps: int) -> None:
        self.loader.max_batches = steps
        self.runner.train_epoch(key)

    def close(self) -> None:
        self.trainer.ctx.writer.close()
        self.tmp.cleanup()


class DeviceData:
    """Device-resident uint8 images and labels with the normalisation kdrun's ArrayLoader applies."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.images, self.labels, self.scale, self.shift = images, labels, scale, shift
        self.device = images.device

    @classmethod
    def of_loader(cls, loader: Any) -> DeviceData:
        return cls(loader.images, loader.labels, loader.scale, loader.shift)

    def batches(self, key: int, batch: int, steps: int, clock: Clock) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches with random crop (zero padding 4) + flip, normalised; ticks ``clock``
        before each batch and after the last step."""
        from kdrun.data.arrays import random_crop_flip

        gen = torch.Generator(device=self.device)
        gen.manual_seed(key)
        order = torch.randperm(len(self.labels), generator=gen, device=self.device)
        for i in range(steps):
            clock.tick()
            idx = order[i * batch:(i + 1) * batch]
            x = random_crop_flip(self.images[idx], KD["crop_padding"], KD["hflip"], gen)
            yield x.float().mul_(self.scale).sub_(self.shift), self.labels[idx]
        clock.tick()


def zoo_model(cfg: Any, which: str, device: torch.device) -> torch.nn.Module:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    node = OmegaConf.to_container(cfg[which].net, resolve=True)
    return instantiate(node, _convert_="all").to(device)


class HandSide(Side):
    """The minimal PyTorch KD loop: frozen teacher (eval, no_grad), student, 0.1 CE + 0.9 KD(T=4), SGD."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, data: DeviceData, batch: int) -> None:
        self.name, self.batch, self.data = "hand", batch, data
        self.teacher, self.student = teacher.eval().requires_grad_(False), student.train()
        self.opt = torch.optim.SGD(student.parameters(), lr=KD["lr"], momentum=KD["momentum"],
                                   weight_decay=KD["weight_decay"])
        self.clock = Clock(data.device)
        self.precision = "fp32"

    def epoch(self, key: int, steps: int) -> None:
        for x, y in self.data.batches(key, self.batch, steps, self.clock):
            with torch.no_grad():
                t = self.teacher(x)
            self.update(self.student(x), t, y)

    def update(self, s: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> None:
        """0.1 CE + 0.9 T^2 KL(teacher || student) at T = 4, backward, SGD step."""
        t_ = KD["temperature"]
        kd = F.kl_div(F.log_softmax(s / t_, dim=-1), F.log_softmax(t / t_, dim=-1), reduction="batchmean",
                      log_target=True) * (t_ * t_)
        loss = KD["ce_weight"] * F.cross_entropy(s, y) + KD["kd_weight"] * kd
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


class HandFastSide(HandSide):
    """The hand-written loop with ``trainer=fast``'s optimisations: bf16 autocast, channels_last models and
    inputs, each model ``torch.compile``'d separately with static shapes (as kdrun compiles them), fused SGD
    on CUDA: the yardstick for ``trainer=fast``."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, data: DeviceData, batch: int,
                 backend: str = "inductor") -> None:
        teacher.to(memory_format=torch.channels_last)
        student.to(memory_format=torch.channels_last)
        super().__init__(teacher, student, data, batch)
        self.name, self.precision = "hand fast", "bf16"
        fused = {"fused": True} if data.device.type == "cuda" else {}
        self.opt = torch.optim.SGD(student.parameters(), lr=KD["lr"], momentum=KD["momentum"],
                                   weight_decay=KD["weight_decay"], **fused)
        self.teacher_call = torch.compile(self.teacher, backend=backend, dynamic=False)
        self.student_call = torch.compile(self.student, backend=backend, dynamic=False)

    def epoch(self, key: int, steps: int) -> None:
        for x, y in self.data.batches(key, self.batch, steps, self.clock):
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.data.device.type, dtype=torch.bfloat16):
                with torch.no_grad():
                    t = self.teacher_call(x)
                s = self.student_call(x)
            self.update(s.float(), t.float(), y)  # the loss in fp32, as kdrun's terms compute it


class TorchdistillSide(Side):
    """torchdistill's ``DistillationBox`` with KD: ``WeightedSumLoss`` of ``KDLoss(T=4, alpha=0.1)``
    (= 0.1 CE + 0.9 T^2 KL), frozen teacher, SGD; fed the same device-resident batches as ``hand``
    (its DataLoader path is not used, so only the training step is compared)."""

    def __init__(self, teacher: torch.nn.Module, student: torch.nn.Module, data: DeviceData, batch: int) -> None:
        from torchdistill.core.distillation import DistillationBox

        self.name, self.batch, self.data = "torchdistill", batch, data
        train_config = {
            "num_epochs": 1,
            "teacher": {"forward_proc": "forward_batch_only", "sequential": [], "wrapper": None,
                        "forward_hook": {"input": [], "output": []}, "requires_grad": False},
            "student": {"forward_proc": "forward_batch_only", "sequential": [], "wrapper": None,
                        "forward_hook": {"input": [], "output": []}, "requires_grad": True},
            "optimizer": {"key": "SGD", "kwargs": {"lr": KD["lr"], "momentum": KD["momentum"],
                                                  "weight_decay": KD["weight_decay"]}},
            "criterion": {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
                "criterion": {"key": "KDLoss", "kwargs": {
                    "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                    "teacher_module_io": "output", "temperature": KD["temperature"], "alpha": KD["ce_weight"],
                    "beta": KD["kd_weight"], "reduction": "batchmean"}},
                "weight": 1.0}}}},
        }
        self.box = DistillationBox(teacher, student, {}, train_config, data.device, None, False, 1.0)
        self.box.teacher_model.eval()
        self.clock = Clock(data.device)
        self.precision = "fp32"

    def epoch(self, key: int, steps: int) -> None:
        self.box.pre_epoch_process(epoch=key)
        for x, y in self.data.batches(key, self.batch, steps, self.clock):
            loss = self.box.forward_process(x, y, supp_dict={})
            self.box.post_forward_process(loss=loss)


# ---------------------------------------------------------------------------------------------- measuring
@dataclass
class Result:
    name: str
    batch: int
    precision: str
    round_step_s: list[float] = field(default_factory=list)  # mean time per step of each round
    step_s: list[float] = field(default_factory=list)  # every timed step
    memory: dict[str, Any] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)  # 1-minute load average after each round (noise diagnostics)

    @property
    def step(self) -> float:
        return statistics.median(self.round_step_s)

    def as_dict(self) -> dict[str, Any]:
        return {"side": self.name, "batch": self.batch, "precision": self.precision,
                "ms_per_step": 1000 * self.step, "ms_per_step_rounds": [1000 * v for v in self.round_step_s],
                "ms_per_step_single_median": 1000 * statistics.median(self.step_s),
                "images_per_s": self.batch / self.step, "cifar100_epoch_s": CIFAR_TRAIN / (self.batch / self.step),
                "memory": self.memory, "load_average_rounds": self.load}


def measure(sides: list[Side], steps: int, warmup: int, rounds: int, log: Callable[[str], None]) -> list[Result]:
    """Warm every side up, then ``rounds`` rounds of ``steps`` steps; the order rotates each round."""
    results = [Result(s.name, s.batch, getattr(s, "precision", "fp32")) for s in sides]
    for s in sides:
        t0 = time.perf_counter()
        s.clock.start()
        s.epoch(0, max(1, warmup))
        s.clock.durations()
        log(f"  warm-up {s.name}: {warmup} steps, {time.perf_counter() - t0:.1f}s")
    for r in range(rounds):
        order = list(range(len(sides)))
        order = order[r % len(sides):] + order[:r % len(sides)]
        parts = []
        for i in order:
            s, res = sides[i], results[i]
            s.clock.start()
            s.epoch(r + 1, steps)
            d = s.clock.durations()[:steps]
            res.step_s.extend(d)
            res.round_step_s.append(sum(d) / len(d))
            if hasattr(os, "getloadavg"):
                res.load.append(os.getloadavg()[0])
            parts.append(f"{s.name} {1000 * res.round_step_s[-1]:.1f} ms")
        load = f"  (load {os.getloadavg()[0]:.2f})" if hasattr(os, "getloadavg") else ""
        log(f"  round {r + 1}/{rounds}: " + ", ".join(parts) + load)
    return results


def probe_memory(args: argparse.Namespace, section: str, side: str, batch: int, trainer: str) -> dict[str, Any]:
    """Peak memory of one side, measured in a fresh subprocess (see the module docstring)."""
    if args.memory_steps <= 0:
        return {}
    cmd = [sys.executable, os.path.abspath(__file__), "--_probe", f"{section}:{side}:{trainer}",
           "--device", args.device, "--teacher", args.teacher, "--student", args.student,
           "--batch-size", str(batch), "--warmup", str(args.warmup), "--steps", str(args.memory_steps),
           "--threads", str(args.threads), *[f"--kdrun-override={o}" for o in args.kdrun_override]]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}


def run_probe(args: argparse.Namespace, device: torch.device) -> None:
    section, side, trainer = args._probe.split(":")
    steps = args.steps + max(1, args.warmup)
    num_train = args.batch_size * steps
    built = build_sides(args, device, side_names=[side], batch=args.batch_size, num_train=num_train, trainer=trainer)
    s = built[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        s.clock.start()
        s.epoch(0, steps)
        s.clock.durations()
        peak = torch.cuda.max_memory_allocated()
        out = {"kind": "cuda max_memory_allocated", "peak_mib": peak / 2**20, "growth_mib": (peak - base) / 2**20}
    else:
        status = proc_status_kib()
        if status is not None:  # the kernel's peak RSS counter, reset here so that it covers training only
            reset = reset_peak_rss()
            base = proc_status_kib()["VmRSS"]
        else:
            reset, base = False, maxrss_kib()
        s.clock.start()
        s.epoch(0, steps)
        s.clock.durations()
        if status is not None:
            peak = proc_status_kib()["VmHWM"]
            kind = "VmHWM (peak RSS, reset at start of training)" if reset else "VmHWM (peak RSS of the process)"
        else:
            peak, kind = maxrss_kib(), "ru_maxrss (peak RSS of the process)"
        out = {"kind": kind, "peak_mib": peak / 1024, "growth_mib": (peak - base) / 1024,
               "ru_maxrss_mib": maxrss_kib() / 1024}
    out["steps"] = steps
    print("PROBE " + json.dumps(out), flush=True)


def build_sides(args: argparse.Namespace, device: torch.device, side_names: list[str], batch: int, num_train: int,
                trainer: str = "default") -> list[Side]:
    """Build the named sides; sides other than kdrun get kdrun's device data and initial weights."""
    overrides = kdrun_overrides(args.teacher, args.student, batch, num_train, device, trainer, args.kdrun_override)
    sides: list[Side] = []
    kd: KdrunSide | None = None
    if "kdrun" in side_names or any(n.startswith("kdrun") for n in side_names):
        kd = KdrunSide("kdrun" if trainer == "default" else f"kdrun {trainer}", overrides, device)
    for name in side_names:
        if name.startswith("kdrun"):
            sides.append(kd)
            continue
        cfg = kd.cfg if kd is not None else compose(overrides)
        teacher, student = zoo_model(cfg, "teacher", device), zoo_model(cfg, "student", device)
        if kd is not None:
            teacher.load_state_dict(kd.pipe.models["teacher"].state_dict())
            student.load_state_dict(kd.pipe.models["student"].state_dict())
            data = DeviceData.of_loader(kd.loader)
        else:
            from kdrun.data.arrays import ArrayLoader
            from kdrun.data.sources import make_synthetic

            src = cfg.data.source
            splits = make_synthetic(num_train=num_train, num_test=batch, shape=list(cfg.data.input_shape),
                                    num_classes=int(cfg.data.num_classes), seed=int(src.seed))
            loader = ArrayLoader(splits.train_images, splits.train_labels, batch_size=batch, train=True,
                                 mean=list(cfg.data.mean), std=list(cfg.data.std), device=device)
            data = DeviceData.of_loader(loader)
        if name == "hand fast":
            sides.append(HandFastSide(teacher, student, data, batch, args.compile_backend))
        else:
            sides.append((HandSide if name == "hand" else TorchdistillSide)(teacher, student, data, batch))
    return sides


# ---------------------------------------------------------------------------------------------- sections
def section_overhead(args: argparse.Namespace, device: torch.device, log: Callable[[str], None],
                     others: list[str]) -> dict[str, Any]:
    names = ["kdrun", *others]
    num_train = args.batch_size * max(args.steps, args.warmup, 1)
    sides = build_sides(args, device, names, args.batch_size, num_train)
    try:
        results = measure(sides, args.steps, args.warmup, args.rounds, log)
    finally:
        sides[0].close()
        del sides
    for res in results:
        res.memory = probe_memory(args, "overhead", res.name, args.batch_size, "default")
    kd = results[0]
    out: dict[str, Any] = {"sides": [r.as_dict() for r in results]}
    for other in results[1:]:
        per_round = [a / b for a, b in zip(kd.round_step_s, other.round_step_s)]
        out[f"ratio_kdrun_over_{other.name}"] = {
            "median": statistics.median(per_round), "min": min(per_round), "max": max(per_round),
            "quartiles": quartiles(per_round), "per_round": per_round, "of_medians": kd.step / other.step,
            "single_step_medians": statistics.median(kd.step_s) / statistics.median(other.step_s),
        }
    return out


def _ratio(a: Result, b: Result) -> dict[str, Any]:
    """How many times faster ``b`` is than ``a`` (time of a / time of b), per round and summarised."""
    per_round = [x / y for x, y in zip(a.round_step_s, b.round_step_s)]
    return {"median": statistics.median(per_round), "min": min(per_round), "max": max(per_round), "per_round": per_round}


def section_presets(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    """kdrun trainer=default and trainer=fast against the hand-written loop plain and with the same
    optimisations, at ``--batch-size`` and ``--large-batch``. torch.compile's caches are reset between
    batch sizes (a second size would otherwise meet the first one's graphs)."""
    if device.type != "cuda" and not args.presets_on_cpu:
        return {"skipped": "needs a GPU (trainer=fast is bf16 + channels_last + torch.compile + fused SGD on CUDA); "
                           "--presets-on-cpu runs it on the CPU as a dry run"}
    import torch._dynamo

    rows = []
    for batch in dict.fromkeys([args.batch_size, args.large_batch]):
        torch._dynamo.reset()
        num_train = batch * max(args.steps, args.warmup, 1)
        log(f" batch {batch}")
        kd_default, hand, hand_fast = build_sides(args, device, ["kdrun", "hand", "hand fast"], batch, num_train)
        kd_fast = build_sides(args, device, ["kdrun"], batch, num_train, trainer="fast")[0]
        sides = [kd_default, kd_fast, hand, hand_fast]
        try:
            results = measure(sides, args.steps, args.warmup, args.rounds, log)
        finally:
            kd_default.close()
            kd_fast.close()
            del sides
        for res, trainer in zip(results[:2], ("default", "fast")):
            res.memory = probe_memory(args, "presets", "kdrun", batch, trainer)
        fast = results[1]
        rows.append({"batch": batch, "sides": [r.as_dict() for r in results],
                     "speedup_fast_over_default": _ratio(results[0], fast),
                     "speedup_hand_fast_over_hand": _ratio(results[2], results[3]),
                     "kdrun_fast_speed_over_hand_fast": _ratio(results[3], fast),
                     "cifar100_240_epochs_min": 240 * CIFAR_TRAIN / (fast.batch / fast.step) / 60})
    return {"rows": rows}


def torchdistill_version() -> str | None:
    try:
        import torchdistill
    except ImportError:
        return None
    return getattr(torchdistill, "__version__", "unknown")


def section_torchdistill(args: argparse.Namespace, device: torch.device, log: Callable[[str], None]) -> dict[str, Any]:
    version = torchdistill_version()
    if version is None:
        return {"skipped": "torchdistill is not importable; it is never a kdrun dependency. To compare: "
                           "python -m venv --system-site-packages /tmp/td && /tmp/td/bin/pip install torchdistill && "
                           "/tmp/td/bin/python scripts/benchmark.py --only torchdistill"}
    out = section_overhead(args, device, log, others=["torchdistill"])
    out["torchdistill_version"] = version
    return out


# ---------------------------------------------------------------------------------------------- report
def fmt_mem(m: dict[str, Any]) -> str:
    if not m:
        return "-"
    if "error" in m:
        return "error"
    return f"{m['peak_mib']:.0f} (+{m['growth_mib']:.0f})"


def side_table(sides: list[dict[str, Any]], mem_label: str) -> list[str]:
    head = f"  {'side':<14} {'batch':>5} {'prec':>5} {'ms/step':>9} {'1-step med':>10} {'img/s':>8} {'CIFAR ep':>9}  {mem_label}"
    lines = [head]
    for s in sides:
        lines.append(f"  {s['side']:<14} {s['batch']:>5} {s['precision']:>5} {s['ms_per_step']:>9.2f} "
                     f"{s['ms_per_step_single_median']:>10.2f} {s['images_per_s']:>8.1f} {s['cifar100_epoch_s']:>8.1f}s  "
                     f"{fmt_mem(s['memory'])}")
    return lines


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def ratio_line(label: str, r: dict[str, Any], target: float | None = None) -> str:
    per_round = r["per_round"]
    med, (q1, q3) = statistics.median(per_round), quartiles(per_round)
    line = (f"  {label}: {med:.3f} = median of {len(per_round)} per-round ratios "
            f"(quartiles {q1:.3f}-{q3:.3f}, min {min(per_round):.3f}, max {max(per_round):.3f}); "
            f"ratio of the ms/step medians {r['of_medians']:.3f}, of the single-step medians {r['single_step_medians']:.3f}")
    if target is not None:
        line += f"\n  target <= {target}: {'PASS' if med <= target else 'FAIL'}"
    return line


def report(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    dev = m["device_name"] if m["device"] == "cuda" else "cpu"
    mem_label = ("peak MiB (+growth) [cuda max_memory_allocated]" if m["device"] == "cuda"
                 else "peak RSS MiB (+growth over start)")
    lines = [
        f"kdrun speed benchmark  {res['date']}",
        f"machine : {m['cpu']} ({m['cpu_count']} logical CPUs), torch {m['torch']}, python {m['python']}, "
        f"device {dev}, torch threads {m['threads']}",
        f"settings: cifar100_kd KD (0.1 CE + 0.9 KD, T=4, SGD lr 0.05 m 0.9 wd 5e-4), teacher {s['teacher']} -> "
        f"student {s['student']}, synthetic 3x32x32 / 100 classes, crop 4 + flip on the device; "
        f"{s['rounds']} rounds x {s['steps']} steps after {s['warmup']} warm-up; memory: {s['memory_steps']} steps in a fresh process",
        "  ms/step = median over rounds of (round wall time / steps); 1-step med = median single step; "
        "img/s = batch / ms/step; CIFAR ep = 50,000 images at that rate",
    ]
    if s["kdrun_override"]:
        lines.append(f"  kdrun overrides: {' '.join(s['kdrun_override'])}")
    if "overhead" in res:
        o = res["overhead"]
        lines += ["", "1. framework overhead: kdrun (trainer=default, fp32) vs a hand-written PyTorch KD loop"]
        lines += side_table(o["sides"], mem_label)
        lines.append(ratio_line("kdrun / hand time per step", o["ratio_kdrun_over_hand"], target=1.03))
    if "presets" in res:
        p = res["presets"]
        lines += ["", "2. trainer=fast (bf16, channels_last, compile, fused SGD) vs trainer=default"]
        if "skipped" in p:
            lines.append(f"  not run: {p['skipped']}")
        else:
            for row in p["rows"]:
                lines += side_table(row["sides"], mem_label)
                sp = row["speedup_fast_over_default"]
                lines.append(f"  batch {row['batch']}: fast is {sp['median']:.2f}x default "
                             f"(rounds min {sp['min']:.2f}, max {sp['max']:.2f})")
                if "kdrun_fast_speed_over_hand_fast" in row:
                    hf, hs = row["kdrun_fast_speed_over_hand_fast"], row["speedup_hand_fast_over_hand"]
                    lines.append(f"  batch {row['batch']}: kdrun fast runs at {hf['median']:.3f}x the speed of the "
                                 f"hand-written loop with the same optimisations (goal >= 0.95; rounds {hf['min']:.3f}-"
                                 f"{hf['max']:.3f}); hand fast is {hs['median']:.2f}x hand; 240 CIFAR-100 epochs at "
                                 f"kdrun fast's rate: {row['cifar100_240_epochs_min']:.1f} min of training steps "
                                 f"(evaluation not included)")
    if "torchdistill" in res:
        t = res["torchdistill"]
        lines += ["", "3. kdrun vs torchdistill (DistillationBox, same KD setting and batches)"]
        if "skipped" in t:
            lines.append(f"  not run: {t['skipped']}")
        else:
            lines[-1] += f"  torchdistill {t['torchdistill_version']}"
            lines += side_table(t["sides"], mem_label)
            lines.append(ratio_line("kdrun / torchdistill time per step", t["ratio_kdrun_over_torchdistill"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/performance.md.")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda")
    p.add_argument("--teacher", default=None, help="zoo teacher (default resnet56 on CPU, resnet32x4 on GPU)")
    p.add_argument("--student", default=None, help="zoo student (default resnet20 on CPU, resnet8x4 on GPU)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--large-batch", type=int, default=512, help="second batch size of the presets comparison")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default 20 CPU, 100 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per side (default 5 CPU, 30 GPU)")
    p.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median over rounds is reported")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (torch.set_num_threads)")
    p.add_argument("--memory-steps", type=int, default=5, help="steps of the memory probe subprocess (0: skip memory)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--only", choices=["overhead", "presets", "torchdistill"], default=None)
    p.add_argument("--kdrun-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for kdrun's config (repeatable), e.g. trainer.tensorboard=false")
    p.add_argument("--presets-on-cpu", action="store_true", help="run the presets comparison on the CPU too (a dry run)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend of the hand-written fast loop (pass the same to kdrun with "
                        "--kdrun-override trainer.compile_backend=...)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--render", default=None, metavar="PATH", help="print the table of a JSON file this script wrote, and exit")
    p.add_argument("--_probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.render:
        res = json.loads(Path(args.render).read_text())
        print(report(res))
        return res
    torch.set_num_threads(args.threads)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    d = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for key in ("teacher", "student", "steps", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    import logging

    logging.getLogger("kdrun").setLevel(logging.WARNING)
    if args._probe:
        run_probe(args, device)
        return None

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    res: dict[str, Any] = {
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": machine_info(device, torch.get_num_threads()),
        "settings": {"teacher": args.teacher, "student": args.student, "batch_size": args.batch_size,
                     "large_batch": args.large_batch, "steps": args.steps, "warmup": args.warmup,
                     "rounds": args.rounds, "memory_steps": args.memory_steps, "kdrun_override": args.kdrun_override},
    }
    wanted = [args.only] if args.only else ["overhead", "presets", "torchdistill"]
    if "overhead" in wanted:
        log("overhead: kdrun vs hand-written loop")
        res["overhead"] = section_overhead(args, device, log, others=["hand"])
    if "presets" in wanted:
        log("presets: trainer=fast vs trainer=default")
        res["presets"] = section_presets(args, device, log)
    if "torchdistill" in wanted:
        log("torchdistill: kdrun vs torchdistill")
        res["torchdistill"] = section_torchdistill(args, device, log)
    res["table"] = report(res)
    print(res["table"])
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
