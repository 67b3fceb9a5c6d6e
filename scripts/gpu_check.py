#!/usr/bin/env python
"""kdrun's GPU check: the GPU path (CUDA, bf16/fp16, channels_last, torch.compile, fused optimizers,
``trainer=fast``) exercised section by section on one device, with a table at the end.

    python scripts/gpu_check.py                          # every section on the GPU, about 10 minutes on an H200
    python scripts/gpu_check.py --quick --device cpu     # the CPU dry run (tiny models; the test suite runs it)
    python scripts/gpu_check.py --only syncs,methods     # some sections
    python scripts/gpu_check.py --wheels .whl            # a machine without hydra/omegaconf: install them offline first

Each section runs in its own process (``--section NAME``) under a time limit, within a total budget
(``--budget``); its results go to ``OUT/NAME.json`` and its output to ``OUT/NAME.log``; the table is
printed and written to ``OUT/report.txt``. ``OUT`` is ``--out``, else ``$OUT``, else /tmp/kdcheck.

Sections (limits for a GPU; ``--quick`` shrinks everything):

=================  ====================================================================================
env                versions, device, bf16 support
tests_cuda         the suite's CUDA-only tests (``pytest -k cuda``)
quickstart         ``python -m kdrun trainer.device=DEV`` (the CLI end to end)
syncs              host-device synchronisations per training step after warm-up: CUDA's sync-debug
                   warnings, an aten-op counter (ops that read device memory on the host), and a
                   host-blocking probe (the GPU kept busy, the host time of one step), for KD, DKD, CRD,
                   TRG, FitNet, mixup-KD in bf16, KD and DML in fp16 with plain and fused SGD
methods            KD, DKD, CRD, TRG, FitNet, ReviewKD under bf16 + channels_last (+ fused): finite, and
                   the step-0 terms against fp32 on the same weights and batch; TRG compiled too
                   (its taps inside the compiled graph: graph breaks)
agreement          KD resnet32x4 -> resnet8x4 from the same weights and batches, trainer=default vs
                   trainer=fast: step-0 loss and the last-50-step mean loss (PASS under 5 %), compile time
throughput         scripts/benchmark.py's presets comparison: kdrun default / fast against the
                   hand-written loop plain / with the same optimisations, batch 64 and 512
determinism        ``trainer.deterministic=true`` for KD (resnet8x4, vgg8), ReviewKD, TRG, CRD and a
                   long-tailed evaluation: which ones run and which stop with kdrun's message
quickstart_fast    ``python -m kdrun trainer=fast`` with ``TORCH_LOGS=recompiles,graph_breaks``: the
                   recompiles an epoch's short last batch costs
=================  ====================================================================================

Synthetic CIFAR-shaped data and random teachers (``teacher.checkpoint=null``) throughout: no download.
Everything goes through kdrun's public engine API (``Trainer.prepare``, ``Trainer.stage_runner``,
``StageRunner.train_step``), so the check breaks when that API does, and the suite's dry run says so.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # kdrun from this checkout when it is not installed (a bare GPU machine)
    sys.path.insert(0, str(REPO))
SECTIONS = {  # name -> time limit on a GPU (seconds)
    "env": 30, "tests_cuda": 90, "quickstart": 60, "syncs": 90, "methods": 120, "agreement": 120,
    "throughput": 180, "determinism": 60, "quickstart_fast": 90,
}
ARGS: argparse.Namespace


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def error_text(ex: BaseException) -> str:
    return f"{type(ex).__name__}: {(str(ex).strip().splitlines() or [''])[0][:300]}"


# ----------------------------------------------------------------------------------------- building runs
def compose(recipe: str, overrides: list[str]) -> Any:
    from kdrun.registry import compose_config

    return compose_config(overrides, recipe)


def pair() -> list[str]:
    return ["teacher=resnet8", "student=resnet8"] if ARGS.quick else ["teacher=resnet32x4", "student=resnet8x4"]


def synthetic(batch: int, steps: int, extra: list[str] = ()) -> list[str]:
    """Overrides of a run on ``batch * steps`` synthetic CIFAR-100-shaped images on ``--device``."""
    return ["data=synthetic", "data.num_classes=100", f"data.batch_size={batch}", "data.crop_padding=4",
            "data.hflip=true", "data.drop_last=true", f"data.source.num_train={batch * steps}",
            f"data.source.num_test={batch}", "teacher.checkpoint=null", "trainer.progress=off",
            "trainer.tensorboard=false", "trainer.save_checkpoints=false", f"trainer.device={ARGS.device}",
            f"trainer.compile_backend={ARGS.backend}", *pair(), *extra]


def fast(compiled: bool = True) -> list[str]:
    """trainer=fast's settings spelled out (trainer=fast itself asks for CUDA; these also run on a CPU)."""
    return ["trainer.precision=bf16", "trainer.channels_last=true", f"trainer.compile={str(compiled).lower()}",
            "trainer.compile_scope=step", "trainer.fused_optimizer=true"]


class Built:
    """A recipe prepared by kdrun's engine (``Trainer.prepare``) in a temporary run directory, with the
    runner of one of its stages (default: the last) and that stage's first-epoch term weights."""

    def __init__(self, recipe: str, overrides: list[str], stage: int = -1) -> None:
        from kdrun.config import validate
        from kdrun.engine.trainer import Trainer

        self.cfg = validate(compose(recipe, overrides))
        self.tmp = tempfile.TemporaryDirectory(prefix="kdcheck-")
        self.trainer = Trainer(self.cfg, Path(self.tmp.name))
        self.experiment = self.trainer.prepare()
        self.runner = self.trainer.stage_runner(stage % len(self.experiment.stages))
        self.runner.set_modes()
        self.weights = self.runner.term_weights(0)
        self.train = self.trainer.ctx.train_loader
        self.test = self.trainer.ctx.test_loader
        self.epoch = 0

    def batches(self, n: int) -> Iterator[dict[str, Any]]:
        served = 0
        while served < n:
            self.train.set_epoch(self.epoch)
            self.epoch += 1
            for batch in self.train:
                yield batch
                served += 1
                if served >= n:
                    return

    def steps(self, n: int) -> tuple[list[float], dict[str, list[float]]]:
        """``n`` training steps; each step's total and term values, read back once at the end."""
        import torch

        totals, parts, keys = [], [], None
        for batch in self.batches(n):
            total, values = self.runner.train_step(batch, self.weights)
            keys = keys or list(values)
            totals.append(total.detach().float())
            parts.append(torch.stack([values[k].float() for k in keys]))
        return torch.stack(totals).tolist(), dict(zip(keys or [], torch.stack(parts).t().tolist()))

    def close(self) -> None:
        self.trainer.ctx.writer.close()
        self.trainer.lock.release()
        self.tmp.cleanup()


def attempt(row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``row`` updated with what ``fn`` returns, or with its error; and the seconds it took."""
    t0 = time.perf_counter()
    try:
        row.update(fn())
    except Exception as ex:  # a check reports a failure and goes on with the next case
        row["error"] = error_text(ex)
        if ARGS.verbose:
            traceback.print_exc()
    row["seconds"] = time.perf_counter() - t0
    return row


def finite(values: list[float]) -> bool:
    return all(math.isfinite(v) for v in values)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def mean(xs: list[float]) -> float:
    return sum(xs) / max(len(xs), 1)


def synchronize() -> None:
    import torch

    if ARGS.device == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------- sections
def section_env() -> dict[str, Any]:
    import hydra
    import omegaconf
    import torch

    import kdrun

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
           "device": ARGS.device, "cuda_available": torch.cuda.is_available(), "hydra": hydra.__version__,
           "omegaconf": omegaconf.__version__, "kdrun_from": str(Path(kdrun.__file__).parent)}
    if ARGS.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                   bf16=torch.cuda.is_bf16_supported(), memory_gib=props.total_memory / 2**30,
                   cudnn=torch.backends.cudnn.version())
    return out


SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique2", "unique_consecutive",
            "bincount", "equal", "is_nonzero", "nonzero_static"}


def kdrun_frame() -> str:
    """The innermost kdrun (or torch.amp / torch.optim) frame of the current stack, as ``file:line``."""
    for fr in reversed(traceback.extract_stack()[:-2]):
        for marker in ("/kdrun/", "/torch/amp/", "/torch/optim/"):
            if marker in fr.filename:
                return f"{marker.strip('/')}/{fr.filename.split(marker, 1)[1]}:{fr.lineno}"
    return "?"


def op_counter() -> Any:
    """A TorchDispatchMode counting the aten ops that make the host wait for a device: reads of device
    values (``item``, ``nonzero``, boolean indexing, ``bincount``, ...) and cross-device copies. On the
    CPU every op is a host op: the count then shows which reads a GPU would pay for (optimizer step
    counters live on the host and are not counted on CUDA)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    cuda = ARGS.device == "cuda"

    class Counter(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.events: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            kwargs = kwargs or {}
            name = func.__name__.split(".")[0]
            hit = name in SYNC_OPS
            if name == "repeat_interleave" and "output_size" not in kwargs:
                hit = True
            if name in ("index", "index_put", "index_put_") and len(args) > 1:
                hit = any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in (args[1] or []) if t is not None)
            if name in ("_to_copy", "copy_") and cuda:
                src = args[1] if name == "copy_" else args[0]
                dst = args[0].device if name == "copy_" else kwargs.get("device")
                if isinstance(src, torch.Tensor) and dst is not None and torch.device(dst).type != src.device.type:
                    hit, name = True, f"{name}[{src.device.type}->{torch.device(dst).type}]"
            if hit and cuda and "[" not in name:
                hit = any(isinstance(a, torch.Tensor) and a.is_cuda for a in args)
            if hit:
                self.events[(f"aten.{name}", kdrun_frame())] += 1
            return func(*args, **kwargs)

    return Counter()


def host_blocking(built: Built, seconds: float = 0.3) -> dict[str, Any]:
    """Whether one step (its batch included) waits for the GPU: keep the GPU busy for ``seconds``
    (``torch.cuda._sleep``) and time the host side of the step. A step free of synchronisations returns
    long before the GPU is free; this also catches waits sync-debug mode cannot see (blocking copies)."""
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**8)
    end.record()
    torch.cuda.synchronize()
    cycles = int(10**8 * seconds / (start.elapsed_time(end) / 1000))
    batches = built.batches(1)
    torch.cuda.synchronize()
    torch.cuda._sleep(cycles)
    t0 = time.perf_counter()
    built.runner.train_step(next(batches), built.weights)
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    return {"host_ms": 1000 * host, "gpu_busy_ms": 1000 * seconds, "blocked": host > 0.8 * seconds}


def count_syncs(recipe: str, extra: list[str], steps: int, batch: int) -> dict[str, Any]:
    import torch

    built = Built(recipe, synthetic(batch, 2 * steps + 4, extra))
    try:
        for b in built.batches(2):  # warm-up: lazy initialisation, CRD's partition constants, cuDNN autotuning
            built.runner.train_step(b, built.weights)
        synchronize()
        batches = built.batches(2 * steps + 1)
        out: dict[str, Any] = {"recipe": recipe, "extra": extra}
        if ARGS.device == "cuda":  # pass 1: sync-debug warnings, per step and while the loader builds a batch
            sites: list[str] = []
            per_step, in_loader = [], 0

            def hook(message, category, filename, lineno, file=None, line=None):  # noqa: ANN001
                if "synchroniz" in str(message).lower():
                    sites.append(f"{Path(filename).name}:{lineno} < {kdrun_frame()}")
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = hook
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    for _ in range(steps):
                        n0 = len(sites)
                        b = next(batches)
                        n1 = len(sites)
                        built.runner.train_step(b, built.weights)
                        in_loader += n1 - n0
                        per_step.append(len(sites) - n1)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            out.update(sync_warnings_per_step=mean(per_step), sync_warnings_in_loader=in_loader,
                       sync_sites=dict(collections.Counter(sites)))
        counter = op_counter()  # pass 2: the op counter
        total = torch.zeros(())
        with counter:
            for _ in range(steps):
                total, _ = built.runner.train_step(next(batches), built.weights)
        out.update(sync_ops_per_step=sum(counter.events.values()) / steps,
                   sync_ops={f"{k[0]} @ {k[1]}": v for k, v in counter.events.items()},
                   finite=math.isfinite(float(total.detach())))
        if ARGS.device == "cuda":
            out["host_blocking"] = host_blocking(built)
        return out
    finally:
        built.close()


def section_syncs() -> dict[str, Any]:
    steps, batch = (2, 8) if ARGS.quick else (10, 64)
    bf16 = fast(compiled=False)
    cases = [("cifar100_kd", bf16), ("cifar100_dkd", bf16), ("cifar100_crd", bf16), ("cifar100_trg", bf16),
             ("cifar100_fitnet", bf16), ("cifar100_mixup_kd", bf16),
             ("cifar100_kd", ["trainer.precision=fp16", "trainer.fused_optimizer=false"]),
             ("cifar100_kd", ["trainer.precision=fp16", "trainer.fused_optimizer=true"]),
             ("cifar100_dml", ["trainer.precision=fp16", "trainer.fused_optimizer=false"])]
    if ARGS.quick:
        cases = cases[:1] + cases[2:4] + cases[6:7]
    rows = []
    for recipe, extra in cases:
        row = attempt({"recipe": recipe, "extra": extra}, lambda: count_syncs(recipe, extra, steps, batch))
        log(f"syncs {recipe} {' '.join(extra)}: {row.get('sync_warnings_per_step')} warnings/step, "
            f"{row.get('sync_ops_per_step')} ops/step {row.get('error', '')}")
        rows.append(row)
    return {"rows": rows}


def section_methods() -> dict[str, Any]:
    import torch._dynamo

    steps, batch = (2, 8) if ARGS.quick else (30, 64)
    recipes = ["cifar100_kd", "cifar100_dkd", "cifar100_crd", "cifar100_trg", "cifar100_fitnet", "cifar100_reviewkd"]
    if ARGS.quick:
        recipes = ["cifar100_kd", "cifar100_crd", "cifar100_trg"]
    rows = []

    def compare(recipe: str) -> dict[str, Any]:
        # the same seed: identical initial weights and first batch, so step 0 compares bf16 with fp32 arithmetic
        ref = Built(recipe, synthetic(batch, steps + 1))
        low = Built(recipe, synthetic(batch, steps + 1, fast(compiled=False)))
        try:
            t_ref, p_ref = ref.steps(1)
            t_low, p_low = low.steps(1)
            tot, parts = low.steps(steps - 1) if steps > 1 else (t_low, p_low)
            return {"step0_rel_diff": {k: rel(p_low[k][0], p_ref[k][0]) for k in p_ref},
                    "step0_fp32": t_ref[0], "step0_bf16": t_low[0], "bf16_last": tot[-1],
                    "bf16_finite": finite(t_low + tot) and all(finite(v) for v in parts.values())}
        finally:
            ref.close()
            low.close()

    for recipe in recipes:
        row = attempt({"recipe": recipe}, lambda: compare(recipe))
        log(f"methods {recipe}: finite {row.get('bf16_finite')} {row.get('error', '')}")
        rows.append(row)

    def compiled_trg() -> dict[str, Any]:
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        built = Built("cifar100_trg", synthetic(batch, steps + 1, fast(compiled=True)))
        try:
            tot, parts = built.steps(min(steps, 10))
        finally:
            built.close()
        counters = torch._dynamo.utils.counters
        return {"bf16_finite": finite(tot) and all(finite(v) for v in parts.values()), "bf16_last": tot[-1],
                "graph_breaks": sum(counters["graph_break"].values()), "graph_break_reasons": dict(counters["graph_break"]),
                "unique_graphs": counters["stats"].get("unique_graphs")}

    rows.append(attempt({"recipe": "cifar100_trg (compiled)"}, compiled_trg))
    log(f"methods TRG compiled: {rows[-1]}")
    return {"rows": rows}


def section_agreement() -> dict[str, Any]:
    import torch._dynamo

    from kdrun.engine.evaluate import evaluate

    steps, batch = (4, 8) if ARGS.quick else (200, 64)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out: dict[str, Any] = {"steps": steps, "batch": batch}
    for name, extra in (("default", []), ("fast", fast(compiled=True))):
        t0 = time.perf_counter()
        built = Built("cifar100_kd", synthetic(batch, steps, extra))
        try:
            first = time.perf_counter()
            tot1, _ = built.steps(1)
            synchronize()
            first = time.perf_counter() - first
            tot, _ = built.steps(steps - 1)
            synchronize()
            with built.runner.autocast():
                top1 = evaluate(built.experiment.models["student"], built.test)["top1"]
        finally:
            built.close()
        tail = tot[-min(50, len(tot)):]
        out[name] = {"step0": tot1[0], "last50_mean": mean(tail), "finite": finite(tot1 + tot), "first_step_s": first,
                     "seconds": time.perf_counter() - t0, "test_top1": top1}
        log(f"agreement {name}: step 0 {tot1[0]:.4f}, last-50 mean {mean(tail):.4f}, first step {first:.1f}s")
    counters = torch._dynamo.utils.counters
    out.update(step0_rel_diff=rel(out["fast"]["step0"], out["default"]["step0"]),
               last50_rel_diff=rel(out["fast"]["last50_mean"], out["default"]["last50_mean"]),
               graph_breaks=dict(counters["graph_break"]), recompiles=dict(counters.get("recompiles", {})),
               unique_graphs=counters["stats"].get("unique_graphs"))
    return out


def section_throughput() -> dict[str, Any]:
    """scripts/benchmark.py's presets comparison (its own timing: alternating rounds, CUDA events)."""
    out_json = Path(ARGS.out) / "throughput_benchmark.json"
    teacher, student = ("cnn_tiny", "cnn_tiny") if ARGS.quick else ("resnet32x4", "resnet8x4")
    sizes = ["--batch-size", "8", "--large-batch", "16"] if ARGS.quick else ["--batch-size", "64", "--large-batch", "512"]
    timing = ["--steps", "2", "--warmup", "1", "--rounds", "2"] if ARGS.quick else ["--steps", "50", "--warmup", "15", "--rounds", "3"]
    cmd = [sys.executable, str(REPO / "scripts" / "benchmark.py"), "--device", ARGS.device, "--only", "presets",
           "--teacher", teacher, "--student", student, *sizes, *timing, "--memory-steps", "0" if ARGS.quick else "5",
           "--compile-backend", ARGS.backend, f"--kdrun-override=trainer.compile_backend={ARGS.backend}",
           "--kdrun-override=trainer.tensorboard=false", "--json", str(out_json), "--quiet"]
    if ARGS.device == "cpu":
        cmd += ["--presets-on-cpu", "--threads", str(os.cpu_count() or 1)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark.py exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    res = json.loads(out_json.read_text())
    rows = []
    for row in res["presets"]["rows"]:
        ips = {s["side"]: s["images_per_s"] for s in row["sides"]}
        rows.append({"batch": row["batch"], "images_per_s": ips,
                     "fast_over_default": row["speedup_fast_over_default"]["median"],
                     "kdrun_fast_over_hand_fast": row["kdrun_fast_speed_over_hand_fast"]["median"],
                     "cifar100_240_epochs_min": row["cifar100_240_epochs_min"]})
    return {"teacher": teacher, "student": student, "rows": rows, "table": res["table"]}


def section_determinism() -> dict[str, Any]:
    """``trainer.deterministic=true`` on the device: each case runs, or stops with kdrun's message."""
    import torch

    from kdrun.engine.evaluate import evaluate

    steps, batch = (1, 8) if ARGS.quick else (3, 64)
    det = ["trainer.deterministic=true"]
    vgg = [*det, "student=vgg8"] + (["teacher=resnet8"] if ARGS.quick else [])
    cases = {"kd (conv, cross-entropy)": ("cifar100_kd", det),
             "kd, vgg8 student (AdaptiveAvgPool2d)": ("cifar100_kd", vgg),
             "reviewkd (adaptive pooling 4x4/2x2 with grad)": ("cifar100_reviewkd", det),
             "trg (gather/index_select backward, cdist)": ("cifar100_trg", det),
             "crd (index_copy_, index_select, sort)": ("cifar100_crd", det)}
    if ARGS.quick:
        cases = dict(list(cases.items())[:1] + list(cases.items())[2:3])
    rows: dict[str, dict[str, Any]] = {}

    def steps_of(recipe: str, extra: list[str]) -> dict[str, Any]:
        built = Built(recipe, synthetic(batch, steps + 1, extra))
        try:
            tot, _ = built.steps(steps)
            return {"finite": finite(tot)}
        finally:
            built.close()

    for label, (recipe, extra) in cases.items():
        rows[label] = attempt({}, lambda: steps_of(recipe, extra))

    def long_tail() -> dict[str, Any]:
        built = Built("cifar100_kd", synthetic(batch, 2, det))
        try:
            groups = {"many": torch.arange(100) < 30, "few": torch.arange(100) >= 30}
            return {"top1": evaluate(built.experiment.models["student"], built.test, None, groups)["top1"]}
        finally:
            built.close()

    rows["evaluation with class groups (weighted bincount)"] = attempt({}, long_tail)
    torch.use_deterministic_algorithms(False)
    for k, v in rows.items():
        log(f"determinism {k}: {v.get('error', 'runs')}")
    return {"rows": rows}


def cli(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdrun", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=ARGS.out)


def section_quickstart() -> dict[str, Any]:
    short = ["data.subset=256", "stages.teacher.epochs=1", "stages.distill.epochs=1"] if ARGS.quick else []
    proc = cli([f"trainer.device={ARGS.device}", "trainer.progress=off", f"hydra.run.dir={Path(ARGS.out) / 'qs_default'}", *short])
    summary = Path(ARGS.out) / "qs_default" / "summary.json"
    out = {"rc": proc.returncode, "tail": proc.stderr.strip().splitlines()[-3:]}
    if summary.is_file():
        s = json.loads(summary.read_text())
        out.update(last_top1=s.get("last_top1"), seconds=s.get("train_time_s"))
    return out


def section_quickstart_fast() -> dict[str, Any]:
    preset = ["trainer=fast"] if ARGS.device == "cuda" else ["trainer=fast", "trainer.device=cpu"]
    short = ["data.subset=256"] if ARGS.quick else []
    proc = cli([*preset, f"trainer.compile_backend={ARGS.backend}", "stages.teacher.epochs=2", "stages.distill.epochs=2",
                "trainer.progress=off", f"hydra.run.dir={Path(ARGS.out) / 'qs_fast'}", *short],
               env={"TORCH_LOGS": "recompiles,graph_breaks"})
    text = proc.stdout + proc.stderr
    summary = Path(ARGS.out) / "qs_fast" / "summary.json"
    out = {"rc": proc.returncode, "recompiles": text.count("Recompiling function"),
           "graph_breaks": text.lower().count("graph break"), "uncompiled_warnings": text.count("runs UNCOMPILED"),
           "tail": proc.stderr.strip().splitlines()[-3:]}
    if summary.is_file():
        out["last_top1"] = json.loads(summary.read_text()).get("last_top1")
    return out


def section_tests_cuda() -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-k", "cuda",
                           str(REPO / "tests")], capture_output=True, text=True, cwd=REPO)
    last = [ln for ln in proc.stdout.splitlines() if any(w in ln for w in ("passed", "failed", "skipped", "error"))]
    return {"rc": proc.returncode, "summary": last[-1] if last else proc.stdout.strip()[-300:]}


# ----------------------------------------------------------------------------------------- report
def fmt(v: Any, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def short_setting(override: str) -> str:
    """``trainer.precision=bf16`` -> ``bf16``, ``trainer.fused_optimizer=false`` -> ``unfused`` (table labels)."""
    key, _, value = override.rpartition("=")
    key = key.rsplit(".", 1)[-1]
    if key == "precision":
        return value
    names = {"channels_last": ("NHWC", ""), "compile": ("compiled", ""), "fused_optimizer": ("fused", "unfused"),
             "compile_scope": ("", "")}
    if key in names:
        return names[key][0] if value == "true" else names[key][1]
    return f"{key}={value}"


def report(out: Path) -> str:
    def load(name: str) -> dict[str, Any] | None:
        p = out / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    lines = ["", "=" * 100, "kdrun GPU check"]
    status = load("status") or {}
    env = load("env")
    if env:
        lines.append(f"  torch {env['torch']} (CUDA {env['cuda']}), python {env['python']}, device "
                     f"{env.get('name', env['device'])}, bf16 {fmt(env.get('bf16'))}; hydra {env['hydra']}, "
                     f"omegaconf {env['omegaconf']}")
    lines.append("  sections: " + ", ".join(f"{k} {v['state']} ({v['seconds']:.0f}s)" for k, v in status.items()))
    for name in ("tests_cuda", "quickstart", "quickstart_fast"):
        r = load(name)
        if r:
            extra = {k: r[k] for k in ("summary", "last_top1", "recompiles", "graph_breaks", "uncompiled_warnings") if k in r}
            lines.append(f"  {name:16} rc={r['rc']} {'PASS' if r['rc'] == 0 else 'FAIL'}  {extra}")
    s = load("syncs")
    if s:
        lines += ["", "  host syncs per training step after warm-up            cuda warnings  sync ops  finite  where"]
        for r in s["rows"]:
            label = " ".join([r['recipe'][9:], *filter(None, (short_setting(e) for e in r['extra']))])[:52]
            if "error" in r:
                lines.append(f"    {label:52} ERROR {r['error'][:120]}")
                continue
            sites = ", ".join(f"{k} x{v}" for k, v in list(r.get("sync_sites", {}).items())[:3])
            ops = ", ".join(f"{k} x{v}" for k, v in list(r["sync_ops"].items())[:3])
            hb = r.get("host_blocking")
            blocked = f" host {hb['host_ms']:.0f}ms of {hb['gpu_busy_ms']:.0f}ms busy{' BLOCKED' if hb['blocked'] else ''}" if hb else ""
            lines.append(f"    {label:52} {fmt(r.get('sync_warnings_per_step')):>13} {fmt(r['sync_ops_per_step']):>9} "
                         f"{fmt(r['finite']):>7}  {sites} {ops}{blocked}".rstrip())
    d = load("determinism")
    if d:
        lines += ["", "  trainer.deterministic=true"]
        for k, v in d["rows"].items():
            lines.append(f"    {k:52} {'runs' if 'error' not in v else 'STOPS: ' + v['error'][:110]}")
    m = load("methods")
    if m:
        lines += ["", "  methods in bf16 (channels_last, fused)               finite  step-0 bf16/fp32 relative difference"]
        for r in m["rows"]:
            if "error" in r:
                lines.append(f"    {r['recipe']:52} ERROR {r['error'][:120]}")
                continue
            diffs = ", ".join(f"{k} {v:.1e}" for k, v in r.get("step0_rel_diff", {}).items())
            extra = f" graph breaks {r['graph_breaks']}, graphs {r['unique_graphs']}" if "graph_breaks" in r else ""
            lines.append(f"    {r['recipe']:52} {fmt(r.get('bf16_finite')):>6}  {diffs}{extra}")
    a = load("agreement")
    if a:
        verdict = "PASS" if a["last50_rel_diff"] < 0.05 else "CHECK"
        lines += ["", f"  trainer=default vs trainer=fast, KD, {a['steps']} steps of batch {a['batch']}: step 0 "
                      f"{a['default']['step0']:.4f} vs {a['fast']['step0']:.4f} (rel {a['step0_rel_diff']:.1e}); last-50 "
                      f"mean {a['default']['last50_mean']:.4f} vs {a['fast']['last50_mean']:.4f} (rel "
                      f"{a['last50_rel_diff']:.2%}) {verdict}; first step {a['default']['first_step_s']:.1f}s vs "
                      f"{a['fast']['first_step_s']:.1f}s (compilation); graphs {a['unique_graphs']}, graph breaks "
                      f"{sum(a['graph_breaks'].values())}"]
    t = load("throughput")
    if t:
        lines += ["", f"  throughput {t['teacher']} -> {t['student']}, images/s",
                  "    batch  kdrun default  kdrun fast   hand  hand fast  fast/default  kdrun fast / hand fast  240 ep (min)"]
        for r in t["rows"]:
            i = r["images_per_s"]
            lines.append(f"    {r['batch']:5} {i['kdrun']:14.0f} {i['kdrun fast']:11.0f} {i['hand']:6.0f} {i['hand fast']:10.0f} "
                         f"{r['fast_over_default']:13.2f} {r['kdrun_fast_over_hand_fast']:23.3f} {r['cifar100_240_epochs_min']:13.1f}")
    for name, v in status.items():
        if v["state"] != "ok":
            lines.append(f"  section {name}: {v['state']} (see {out / (name + '.log')})")
    lines.append("=" * 100)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- running
def install_offline(wheels: Path) -> dict[str, str]:
    """Install what kdrun needs and this machine lacks (hydra-core, omegaconf, antlr4, PyYAML, packaging,
    pytest) from the wheel folder ``wheels`` into a private site folder; the environment to run with."""
    import importlib.util

    needed = {"hydra": "hydra-core", "omegaconf": "omegaconf", "antlr4": "antlr4-python3-runtime", "yaml": "PyYAML",
              "packaging": "packaging", "pytest": "pytest pluggy iniconfig pygments"}
    missing = [pkg for mod, pkg in needed.items() if importlib.util.find_spec(mod) is None]
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if not missing:
        return env
    site = Path(tempfile.gettempdir()) / "kdcheck-site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--upgrade", "--no-index", "--no-deps", "--find-links",
           str(wheels), "--target", str(site), *" ".join(missing).split()]
    log(f"installing from {wheels}: {' '.join(missing)}")
    subprocess.run(cmd, check=True)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    return env


def run_all(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HYDRA_FULL_ERROR="1", PYTHONDONTWRITEBYTECODE="1")
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tempfile.gettempdir()) / "kdcheck-inductor"))
    env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if args.wheels:
        env.update(install_offline(Path(args.wheels)))
    names = [n for n in SECTIONS if not args.only or n in args.only]
    started, status = time.perf_counter(), {}
    for name in names:
        left = args.budget - (time.perf_counter() - started)
        limit = min(SECTIONS[name] * args.limit_scale, left)
        if limit < 10:
            status[name] = {"state": "skipped (budget spent)", "seconds": 0.0}
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), "--section", name, "--out", str(out), "--device", args.device,
               "--backend", args.backend, *(["--quick"] if args.quick else [])]
        t0 = time.perf_counter()
        log(f"== {name} (limit {limit:.0f}s)")
        with open(out / f"{name}.log", "w") as logfile:
            try:
                rc = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, timeout=limit).returncode
                state = "ok" if rc == 0 else f"failed (rc={rc})"
            except subprocess.TimeoutExpired:
                state = f"timed out after {limit:.0f}s"
        status[name] = {"state": state, "seconds": time.perf_counter() - t0}
        log(f"   {state} in {status[name]['seconds']:.0f}s")
        (out / "status.json").write_text(json.dumps(status, indent=2))
    text = report(out)
    (out / "report.txt").write_text(text)
    print(text)
    return 0 if all(v["state"] == "ok" for v in status.values()) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See docs/performance.md.")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--quick", action="store_true", help="tiny models, batches and steps (the CPU dry run)")
    p.add_argument("--out", default=os.environ.get("OUT") or str(Path(tempfile.gettempdir()) / "kdcheck"))
    p.add_argument("--backend", default=None, help="torch.compile backend (default inductor on CUDA, aot_eager on CPU)")
    p.add_argument("--only", default=None, help="comma-separated sections: " + ", ".join(SECTIONS))
    p.add_argument("--budget", type=float, default=660.0, help="seconds for all sections together")
    p.add_argument("--limit-scale", type=float, default=1.0, help="multiplies every section's time limit (slow machines)")
    p.add_argument("--wheels", default=None, metavar="DIR", help="install missing packages from this wheel folder first")
    p.add_argument("--section", default=None, choices=list(SECTIONS), help="run one section in this process")
    p.add_argument("--report", action="store_true", help="print the table of --out and exit")
    p.add_argument("--verbose", action="store_true", help="tracebacks of failing cases")
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.backend = args.backend or ("inductor" if args.device == "cuda" else "aot_eager")
    if args.only:
        args.only = [s.strip() for s in args.only.split(",") if s.strip()]
        unknown = [s for s in args.only if s not in SECTIONS]
        if unknown:
            p.error(f"unknown section(s) {', '.join(unknown)}; sections: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    global ARGS
    ARGS = args = parse_args(argv)
    if args.report:
        print(report(Path(args.out)))
        return 0
    if args.section is None:
        return run_all(args)
    import torch

    logging.getLogger("kdrun").setLevel(logging.ERROR)  # random teachers: their banners are expected here
    if args.device == "cpu":
        torch.set_num_threads(min(8, os.cpu_count() or 1))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    data = globals()[f"section_{args.section}"]()
    data["section_seconds"] = time.perf_counter() - t0
    (Path(args.out) / f"{args.section}.json").write_text(json.dumps(data, indent=2, default=str))
    log(f"{args.section} done in {data['section_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
