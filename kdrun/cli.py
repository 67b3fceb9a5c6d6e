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
from kdrun.engine.interrupt import RunInterrupted
from kdrun.errors import KdrunError
from kdrun.paths import config_dir, run_name_problem
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

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    run_dir = Path(hc.runtime.output_dir)
    if multirun:
        SWEEP["jobs"] += 1
        SWEEP["dir"] = str(hc.sweep.dir)
    try:
        cfg = validate(cfg)
        cfg = _gpu_per_parallel_job(cfg)
        summary = run(cfg, run_dir)
    except RunInterrupted as ex:  # a signal: the checkpoint is written; say how to go on
        print(_interrupted_message(ex, run_dir), file=sys.stderr, flush=True)
        log.warning("run interrupted: %s", ex)
        sys.exit(ex.exit_code)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before training started
        last = run_dir / "checkpoints" / "last.pt"
        hint = (f"the last checkpoint ({last}) resumes with: kdrun hydra.run.dir={run_dir} resume=auto" if last.is_file()
                else "no checkpoint had been written yet")
        print(f"kdrun: stopped at once by Ctrl-C; {hint}", file=sys.stderr)
        sys.exit(130)
    except (KdrunError, OSError) as ex:  # a user mistake, or the file system (full disk, permissions)
        return _failed(run_dir, f"kdrun: error: {ex if isinstance(ex, KdrunError) else _os_error(ex)}", multirun)
    except Exception as ex:  # an unexpected failure (a bug): recorded; the sweep goes on, a single run shows the traceback
        from kdrun.engine import distributed

        info = distributed.launched_info()
        timeout = distributed.timeout_message(ex, info, cfg.trainer.get("dist_timeout_s", 600))
        if timeout is None and info.rank > 0 and any(w in str(ex) for w in ("Connection closed", "remote worker",
                                                                              "Connection reset", "Broken pipe")):
            timeout = f"rank {info.rank} of {info.world_size} lost the other ranks (one of them failed first: see its message)"
        if timeout is not None:
            return _failed(run_dir, f"kdrun: error: {timeout}", multirun)
        _job_failed(run_dir, "".join(traceback.format_exception(ex)))
        if not multirun:
            raise
        return math.nan
    if summary is None:  # ranks above 0 of a DDP run
        return math.nan
    _report(summary)
    value = summary.get(cfg.get("objective") or "best_top1")
    return float(value) if value is not None else math.nan


def _failed(run_dir: Path, message: str, multirun: bool) -> float:
    """Record the failure; a sweep goes on with the next job (NaN objective), a single run exits 2."""
    _job_failed(run_dir, message)
    if multirun:
        return math.nan
    print(message, file=sys.stderr)
    sys.exit(2)


def _interrupted_message(ex: RunInterrupted, run_dir: Path) -> str:
    lines = [f"kdrun: {ex}."]
    if ex.checkpoint is None:
        lines.append("  no checkpoint was written (trainer.save_checkpoints=false): a new run starts from the beginning")
    else:
        lines += [f"  checkpoint: {ex.checkpoint}",
                  f"  resume with: kdrun hydra.run.dir={run_dir} resume=auto   (the run's own overrides are reused)"]
    return "\n".join(lines)


# keys a resumed run may set differently from the run it continues: they change no result
RESUME_FREE_KEYS = ("resume", "trainer.progress", "trainer.dist_timeout_s", "trainer.tensorboard")


def resume_overrides(args: list[str]) -> list[str] | None:
    """With ``resume=auto`` and ``hydra.run.dir=DIR`` of an existing run, the command line that continues
    it: the run's saved overrides (``DIR/.hydra/overrides.yaml``) plus the given ones. None when there
    is no such run; a KdrunError names any given override that contradicts the saved ones. (``resume=DIR``
    instead of ``auto`` takes the command line as it is: a deliberate change, e.g. more epochs.)"""
    import yaml

    given = [a for a in args if not a.startswith("-")]
    if "resume=auto" not in given:
        return None
    run_dir = next((a.split("=", 1)[1] for a in given if a.startswith("hydra.run.dir=")), None)
    if run_dir is None:
        return None
    saved_file = Path(run_dir).expanduser() / ".hydra" / "overrides.yaml"
    if not saved_file.is_file():
        return None
    try:
        saved = [str(o) for o in (yaml.safe_load(saved_file.read_text()) or [])]
    except (OSError, yaml.YAMLError) as ex:
        raise KdrunError(f"resume=auto: cannot read the run's overrides {saved_file}: {ex}") from None

    def key(o: str) -> str:
        return o.split("=", 1)[0].lstrip("+~")

    def free(o: str) -> bool:
        return key(o).startswith("hydra.") or key(o) in RESUME_FREE_KEYS

    before = {key(o): o for o in saved if not free(o)}  # the last occurrence of a key is the one Hydra applies
    now = {key(o): o for o in given if not free(o)}
    conflicts = [o for k, o in now.items() if before.get(k) != o]
    if conflicts:
        shown = ", ".join(f"{o} (the run had {before[key(o)]})" if key(o) in before else f"{o} (not set in the run)"
                          for o in conflicts)
        raise KdrunError(f"resume=auto continues {run_dir} with its own overrides ({' '.join(before.values()) or 'none'}); "
                         f"these contradict them: {shown}. Drop them; or, to continue the checkpoint with a changed "
                         f"config on purpose, name it: resume={run_dir} (the command line is then taken as it is).")
    return [o for o in saved if not free(o)] + [a for a in args if a.startswith("-") or free(a)]


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


SWEEP: dict = {"jobs": 0, "failed": 0, "dir": None}  # this process's multirun jobs (basic and Optuna launchers run them here)


def _os_error(ex: OSError) -> str:
    from kdrun.engine.checkpoint import write_failure

    return write_failure(Path(ex.filename), ex) if getattr(ex, "filename", None) else str(ex)


def _job_failed(run_dir: Path, message: str) -> None:
    """Record a failed run or sweep job: the error in ``kdrun.log`` and in a ``FAILED`` file of its directory."""
    SWEEP["failed"] += 1
    log.error("run failed: %s", message.strip())
    from kdrun.engine.distributed import launched_info

    if launched_info().rank > 0:  # under DDP rank 0 keeps the record; the other ranks share its directory
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "FAILED").write_text(message.rstrip() + "\n")
    except OSError:  # an unwritable run directory: the message on stderr is all there is
        pass


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
    timeout = next((a.split("=", 1)[1] for a in args if a.startswith("trainer.dist_timeout_s=")), distributed.DEFAULT_TIMEOUT_S)
    try:
        timeout = float(timeout)
        assert timeout > 0
    except (ValueError, AssertionError):
        print(f"kdrun: error: trainer.dist_timeout_s must be a positive number of seconds, got {timeout}", file=sys.stderr)
        sys.exit(2)
    info = distributed.init(device, timeout)
    stamp = distributed.broadcast_object(time.strftime("%Y-%m-%d/%H-%M-%S"), info)
    extra = [] if any(a.startswith("hydra.run.dir=") for a in args) else [f"hydra.run.dir=outputs/${{name}}/{stamp}"]
    if not info.is_main:
        extra += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    sys.argv[1:] = _with_overrides(sys.argv[1:], extra)


def group_options(group: str) -> list[str] | None:
    """The options of config group ``group`` (files in configs/<group>/ and ConfigStore entries), or None
    when it is not one of kdrun's groups."""
    from hydra.core.config_store import ConfigStore

    folder = config_dir() / group
    stored: list[str] = []
    try:
        stored = [n.removesuffix(".yaml") for n in ConfigStore.instance().list(group)]
    except OSError:  # not a ConfigStore group
        pass
    files = [p.stem for p in folder.glob("*.yaml")] if folder.is_dir() else []
    return sorted(set(stored) | set(files)) if stored or folder.is_dir() else None


def check_group_choices(args: list[str]) -> str | None:
    """One line for the first ``group=option`` (or sweep ``group=a,b``) naming an option that does not
    exist, with the closest names; None when all exist (or when a user search path may add options)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if any(a.startswith(("hydra.searchpath", "--config-dir", "-cd", "--config-path", "-cp")) for a in args):
        return None
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # a syntax error: Hydra's own message says where
        return None
    for o in overrides:
        group = o.key_or_group.split("@", 1)[0]
        if "/" in group or group == "hydra" or "." in group or o.is_delete():
            continue
        options = group_options(group)
        if options is None:
            continue
        try:
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        except Exception:  # ranges, globs and other sweep forms
            continue
        for value in values:
            if value in ("null", "None") or value in options:
                continue
            from kdrun.errors import did_you_mean

            close = did_you_mean(value, options)
            listing = ", ".join(options) if len(options) <= 30 else f"{len(options)} options, see kdrun --help"
            return f"no {group} '{value}'.{close} Options of {group}: {listing}."
    return None


def check_paths(args: list[str]) -> str | None:
    """One line when a run or sweep directory given on the command line cannot be created or written, or
    ``name=`` cannot be part of a path (Hydra creates the directory before kdrun's checks run)."""
    import tempfile

    from kdrun.engine.checkpoint import write_error_reason

    for a in args:
        key, _, value = a.partition("=")
        if key in ("name", "+name", "++name") and (problem := run_name_problem(value)) is not None:
            return problem
        if key not in ("hydra.run.dir", "hydra.sweep.dir") or "${" in value:
            continue
        path = Path(value).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path, prefix=".kdrun-write-test-"):
                pass
        except OSError as ex:
            return (f"{key}={value[:80]}{'...' if len(value) > 80 else ''}: cannot create or write this directory: "
                    f"{write_error_reason(ex)}")
    return None


def main() -> None:
    """Console entry point: default to the quickstart recipe, then hand over to Hydra."""
    args = sys.argv[1:]
    try:
        resumed = resume_overrides(args)
    except KdrunError as ex:
        print(f"kdrun: error: {ex}", file=sys.stderr)
        sys.exit(2)
    if resumed is not None:
        args = sys.argv[1:] = resumed
    bad = check_paths(args)
    if bad is not None:
        print(f"kdrun: error: {bad}", file=sys.stderr)
        sys.exit(2)
    run_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.run.dir=")), None)
    if run_dir is not None and not any(a in ("-m", "--multirun") for a in args):
        from kdrun.engine.runlock import busy_message, lock_owner

        owner = lock_owner(Path(run_dir).expanduser())
        if owner is not None:  # before Hydra writes its files into the busy directory
            print(f"kdrun: error: {busy_message(Path(run_dir), owner)}", file=sys.stderr)
            sys.exit(2)
    if not _uses_recipe(args):
        sys.argv[1:] = _with_overrides(args, [f"+recipe={DEFAULT_RECIPE}"])
    _agree_on_run_dir(args)
    try:
        register_configs()
    except KdrunError as ex:
        print(f"kdrun: error: {ex}", file=sys.stderr)
        sys.exit(2)
    install_override_suggestions()
    bad = check_group_choices(sys.argv[1:])
    if bad is not None:
        print(f"kdrun: error: {bad}", file=sys.stderr)
        sys.exit(2)
    sweep = any(a in ("-m", "--multirun") for a in args)
    try:
        _task()
    except SystemExit as ex:  # Hydra reports a composition error and exits
        if sweep and ex.code not in (0, None):
            ran = SWEEP["jobs"]
            what = "no job ran" if not ran else f"{ran} job(s) ran before it, under {SWEEP['dir']}"
            print(f"kdrun: the sweep stopped at a config error: {what}", file=sys.stderr)
        raise
    if SWEEP["failed"] and SWEEP["jobs"]:
        print(f"kdrun: {SWEEP['failed']} of {SWEEP['jobs']} jobs failed (see the FAILED files under {SWEEP['dir']})",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
