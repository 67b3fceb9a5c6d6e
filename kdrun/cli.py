"""The ``kdrun`` command: Hydra composes the config, kdrun validates it and runs the engine.

``kdrun`` alone runs the quickstart recipe; ``kdrun +recipe=NAME key=value ...`` any other;
``kdrun -m ...`` sweeps (Hydra multirun); ``kdrun --help`` lists groups and recipes.
"""
from __future__ import annotations

import logging
import math
import re
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from kdrun._hydra_compat import install_override_suggestions
from kdrun.errors import KdrunError
from kdrun.paths import config_dir
from kdrun.registry import register_configs

log = logging.getLogger("kdrun")
DEFAULT_RECIPE = "quickstart"


_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
                "--experimental-rerun", "--info", "-i"}


def _with_overrides(args: list[str], extra: list[str]) -> list[str]:
    """``args`` with ``extra`` overrides added after the flags (Hydra's parser wants overrides together)."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("-"):
            flags.append(a)
            if a in _VALUE_FLAGS and i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(a)
        i += 1
    return flags + extra + overrides


def _uses_recipe(args: list[str]) -> bool:
    return any(re.match(r"^[+~]{0,2}recipe(=|$)", a) for a in args)


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="kdrun")
def _task(cfg: DictConfig) -> float:
    from kdrun.config import validate
    from kdrun.engine import run

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        cfg = validate(cfg)
        cfg = _gpu_per_parallel_job(cfg)
        summary = run(cfg, run_dir)
    except KdrunError as ex:
        if multirun:  # one failed job must not stop the sweep
            return _job_failed(run_dir, f"kdrun: error: {ex}")
        print(f"kdrun: error: {ex}", file=sys.stderr)
        sys.exit(2)
    except Exception as ex:  # an unexpected failure: the sweep goes on, the job says why
        if not multirun:
            raise
        return _job_failed(run_dir, "".join(traceback.format_exception(ex)))
    if summary is None:  # ranks above 0 of a DDP run
        return math.nan
    _report(summary)
    value = summary.get(cfg.get("objective") or "best_top1")
    return float(value) if value is not None else math.nan


def _gpu_per_parallel_job(cfg: DictConfig) -> DictConfig:
    """Jobs that a local parallel launcher (joblib) runs side by side each take their own GPU,
    by job number, when ``trainer.device`` is auto or cuda and the machine has several."""
    hc = HydraConfig.get()
    launcher = str(hc.launcher.get("_target_", "")) if hc.mode == RunMode.MULTIRUN else ""
    if "joblib" not in launcher.lower() or cfg.trainer.device not in ("auto", "cuda"):
        return cfg
    import torch

    count = torch.cuda.device_count()
    if count < 2:
        return cfg
    out = OmegaConf.create(OmegaConf.to_container(cfg))
    out.trainer.device = f"cuda:{int(hc.job.num) % count}"
    return out


def _job_failed(run_dir: Path, message: str) -> float:
    """Record a failed sweep job (``FAILED`` in its directory) and let the sweep continue."""
    log.error("job failed: %s", message.strip().splitlines()[-1])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "FAILED").write_text(message.rstrip() + "\n")
    return math.nan


def _report(s: dict) -> None:
    lines = [f"kdrun: {s['name']} finished in {s['wall_time_s']:.1f} s"]
    where = s.get("eval_set", "test")
    frozen_ppl = s.get("frozen_ppl") or {}
    for name, top1 in s["frozen_top1"].items():
        tag = ", random init" if name in s["random_models"] else ""
        if name in frozen_ppl:
            lines.append(f"  {name} (frozen{tag}) {where} perplexity: {frozen_ppl[name]:.2f} (token top-1 {top1:.2f})")
        else:
            lines.append(f"  {name} (frozen{tag}) {where} top-1: {top1:.2f}")
    for stage, st in s["stages"].items():
        if st.get("best_ppl") is not None:
            lines.append(f"  [{stage}] {st['eval_model']} {where} perplexity: best {st['best_ppl']:.2f} "
                         f"(step {st['best_ppl_step']}), last {st['last_ppl']:.2f}")
        elif st.get("best_top1") is not None:
            lines.append(f"  [{stage}] {st['eval_model']} {where} top-1: best {st['best_top1']:.2f} (epoch {st['best_epoch']}), "
                         f"last {st['last_top1']:.2f}")
        for model, ms in (st.get("models") or {}).items():  # co-trained models
            if ms.get("best_top1") is not None:
                lines.append(f"  [{stage}] {model} (co-trained) {where} top-1: best {ms['best_top1']:.2f}, last {ms['last_top1']:.2f}")
    for name, g in (s.get("generation") or {}).items():
        spread = f" +- {g['rouge_l_std']:.2f} over {len(g['per_seed'])} seeds" if len(g["per_seed"]) > 1 else ""
        lines.append(f"  {name} ROUGE-L on {g['examples']} {where} prompts: {g['rouge_l']:.2f}{spread}")
    for name, top1 in (s.get("probe") or {}).items():
        lines.append(f"  linear probe on {name}: {where} top-1 {top1:.2f}")
    if s.get("shot_top1"):
        lines.append("  many / medium / few-shot top-1 (last): " + " / ".join(f"{v:.2f}" for v in s["shot_top1"].values()))
    pub = s.get("published")
    if pub and pub.get("comparable", True):
        delta = f"{pub['delta']:+.2f}" if pub.get("delta") is not None else "n/a"
        lines.append(f"  published ({pub['metric']}): {pub['top1']:.2f} [{pub['source']}], difference {delta}")
    elif pub:
        lines.append(f"  published ({pub['metric']}): {pub['top1']:.2f} [{pub['source']}]: NOT COMPARABLE, a smoke run "
                     f"({'; '.join(s['not_comparable'])})")
    elif s.get("not_comparable"):
        lines.append(f"  smoke run ({'; '.join(s['not_comparable'])}): not comparable with full runs")
    lines.append(f"  run directory: {s['run_dir']}")
    print("\n".join(lines), flush=True)


def _agree_on_run_dir(args: list[str]) -> None:
    """Under torchrun every rank runs Hydra: join the process group first and give all ranks rank 0's
    run directory; ranks above 0 write no Hydra files and no logs."""
    from kdrun.engine import distributed

    if not distributed.launched_info().enabled:
        return
    device = next((a.split("=", 1)[1] for a in args if a.startswith("trainer.device=")), "auto")
    info = distributed.init(device)
    stamp = distributed.broadcast_object(time.strftime("%Y-%m-%d/%H-%M-%S"), info)
    extra = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir=outputs/${{name}}/{stamp}"]
    if not info.is_main:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    sys.argv[1:] = _with_overrides(sys.argv[1:], extra)


def main() -> None:
    """Console entry point: default to the quickstart recipe, then hand over to Hydra."""
    args = sys.argv[1:]
    if not _uses_recipe(args):
        sys.argv[1:] = _with_overrides(args, [f"+recipe={DEFAULT_RECIPE}"])
    _agree_on_run_dir(args)
    try:
        register_configs()
    except KdrunError as ex:
        print(f"kdrun: error: {ex}", file=sys.stderr)
        sys.exit(2)
    install_override_suggestions()
    _task()


if __name__ == "__main__":
    main()
