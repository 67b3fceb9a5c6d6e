"""Validation of a composed config, before anything is built.

Hydra composes the config; :func:`validate` then checks it and turns every mistake into one
:class:`~kdrun.errors.KdrunError` that names the key and suggests the closest valid one. Fixed sections
are checked against the schema dataclasses of :mod:`kdrun.schema` (where every default lives);
sections whose keys depend on a class (loss terms, adapters, optimizers, data sources) are checked
against that class's signature; the rules of stages, optimizer groups, ``init_from`` and rounds are
checked by the planning functions of :mod:`kdrun.plan`, the same ones the builder uses.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import warnings
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kdrun import plan
from kdrun.errors import KdrunError, did_you_mean, first_line
from kdrun.paths import run_name_problem
from kdrun.plan import model_key
from kdrun.schema import (ADAPTER_KEYS, DTYPES, LOSS_KEYS, OBJECTIVES, TOP_LEVEL_KEYS,
                          CoTrainConfig, DataConfig, ExperimentConfig, ModelConfig, GenerationConfig, ProbeConfig, PublishedConfig,
                          RoundsConfig, StageConfig, TrainerConfig, experiment_config, model_entries)

model_configs = model_entries  # all configured models by name (kdrun.schema.model_entries)

__all__ = ["tool_config", "validate", "model_configs", "model_key", "import_target", "ADAPTER_KEYS", "LOSS_KEYS"]

# ------------------------------------------------------------------------------------- validation


def validate(cfg: DictConfig) -> DictConfig:
    """Check a composed config and return a resolved copy with every schema default filled in.

    Raises KdrunError naming the first bad key and the fix. ``cfg`` itself is not changed.
    """
    _resolve_all(cfg)
    for key in cfg.keys():
        if key not in TOP_LEVEL_KEYS:
            raise KdrunError(
                f"unknown top-level key '{key}'.{did_you_mean(key, TOP_LEVEL_KEYS)} "
                f"Valid keys: {', '.join(sorted(TOP_LEVEL_KEYS - {'hydra'}))}."
            )
    _check_section(cfg, "data", DataConfig)
    _check_section(cfg, "trainer", TrainerConfig)
    _check_choices(cfg)
    if cfg.get("published") is not None:
        _check_section(cfg, "published", PublishedConfig)
    models = model_configs(cfg)
    for name, mcfg in models.items():
        _check_node(mcfg, model_key(name), ModelConfig)
        _check_target(mcfg.net, f"{model_key(name)}.net")
    _check_source(cfg)
    names = _tensor_owners(cfg, models)
    for name, acfg in (cfg.get("adapters") or {}).items():
        _check_component(acfg, f"adapters.{name}", ADAPTER_KEYS, names)
    for name, lcfg in (cfg.get("loss") or {}).items():
        _check_component(lcfg, f"loss.{name}", LOSS_KEYS, names)
    _check_stage_nodes(cfg)
    if cfg.get("batch_transform"):  # an empty node (batch_transform=none) is no transform
        _check_target(cfg.batch_transform, "batch_transform")
    for key, schema in (("rounds", RoundsConfig), ("probe", ProbeConfig), ("generation", GenerationConfig)):
        if cfg.get(key) is not None:
            _check_node(cfg[key], key, schema)
    if cfg.get("resume") not in (None, "auto") and not isinstance(cfg.get("resume"), str):
        raise KdrunError("resume must be null, 'auto' or the path of a run directory or checkpoint")
    _check_plan(experiment_config(cfg))
    return _complete(cfg)


def _check_choices(cfg: DictConfig) -> None:
    """Values that must be one of a few words, and their dependencies."""
    if cfg.get("objective", "best_top1") not in OBJECTIVES:
        raise KdrunError(f"objective must be one of {', '.join(OBJECTIVES)} (the summary value a sweep optimises), "
                         f"got '{cfg.objective}'")
    if cfg.get("objective") == "probe_top1" and cfg.get("probe") is None:
        raise KdrunError("objective=probe_top1 needs a linear probe: set probe (e.g. +probe.models=[student] +probe.tap=feat)")
    _check_ranges(cfg)
    t = cfg.trainer
    if t.get("progress", "auto") not in ("auto", "on", "off"):
        raise KdrunError(f"trainer.progress must be auto, on or off, got '{t.progress}'")
    if t.get("compile_mode", "default") not in COMPILE_MODES:
        raise KdrunError(f"trainer.compile_mode must be one of {', '.join(COMPILE_MODES)}, got '{t.compile_mode}'")
    if t.get("compile_scope", "models") not in ("models", "step"):
        raise KdrunError(f"trainer.compile_scope must be models (each model's forward compiled) or step (a stage's "
                         f"models, adapters and loss terms compiled as one function), got '{t.compile_scope}'")
    if t.get("compile"):
        import torch._dynamo

        backends = torch._dynamo.list_backends(exclude_tags=())
        if t.get("compile_backend", "inductor") not in backends:
            raise KdrunError(f"trainer.compile_backend '{t.compile_backend}' is not a torch.compile backend."
                             f"{did_you_mean(str(t.compile_backend), backends)} Backends: {', '.join(backends)}.")
    if t.get("precision", "fp32") not in ("fp32", "bf16", "fp16"):
        raise KdrunError(f"trainer.precision must be fp32, bf16 or fp16, got '{t.precision}'")
    for key in ("accumulate_grad_batches", "log_every", "eval_every", "save_every"):
        if key in t and int(t[key]) < 1:
            raise KdrunError(f"trainer.{key} must be at least 1, got {t[key]}")
    for key in ("eval_every_steps", "save_every_steps"):
        if t.get(key) is not None and int(t[key]) < 1:
            raise KdrunError(f"trainer.{key} must be at least 1 (or null: only at epoch ends), got {t[key]}")
    for term in t.get("monitor") or []:
        if term not in (cfg.get("loss") or {}):
            raise KdrunError(f"trainer.monitor: no loss term '{term}'.{did_you_mean(str(term), cfg.get('loss') or {})} "
                             f"Monitors are terms defined under loss (evaluated, never trained).")
        for arg, name in dict(cfg.loss[term].get("inputs") or {}).items():
            for n in ([name] if isinstance(name, str) else list(name)):
                if str(n).startswith("adapters."):
                    raise KdrunError(f"trainer.monitor: loss.{term}.inputs.{arg} reads an adapter ({n}); monitors read "
                                     f"models' tensors and batch fields only")
    if t.get("gradient_clip_norm") is not None and not float(t.gradient_clip_norm) > 0:
        raise KdrunError(f"trainer.gradient_clip_norm must be positive (or null: no clipping), got {t.gradient_clip_norm}")
    if cfg.get("published") is not None and cfg.published.get("metric") not in ("best", "last"):
        raise KdrunError(f"published.metric must be 'best' or 'last', got '{cfg.published.get('metric')}'")


def _at_least(node: Any, prefix: str, key: str, low: int | float, null: str | None = None, number: type = int) -> None:
    """``node[key]`` (when set) a number of type ``number`` of at least ``low``; ``null`` says what null means."""
    value = node.get(key) if isinstance(node, DictConfig) else None
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (number is float or isinstance(value, int))
    if not ok or value < low:
        also = f" (or null: {null})" if null else ""
        kind = "an integer" if number is int else "a number"
        raise KdrunError(f"{prefix}.{key} must be {kind} of at least {low}{also}, got {value!r}")


def _check_ranges(cfg: DictConfig) -> None:
    """Numbers outside their meaningful range: errors, never a silent other meaning (0 is not "no cap")."""
    d, t = cfg.data, cfg.trainer
    _at_least(d, "data", "subset", 1, "the whole data set")
    _at_least(d, "data", "val_split", 1, "evaluate on the test set")
    _at_least(d, "data", "meta_split", 1, "no meta set")
    for key in ("batch_size", "eval_batch_size"):
        _at_least(d, "data", key, 1)
    for key in ("num_classes", "num_workers", "crop_padding", "subset_seed", "val_seed"):  # 0 classes: token data
        _at_least(d, "data", key, 0)
    _at_least(t, "trainer", "max_epochs", 1, "no cap")
    _at_least(t, "trainer", "max_steps_per_epoch", 1, "no cap")
    _at_least(t, "trainer", "dist_timeout_s", 1, number=float)
    for key, optional in (("name", False), ("method", True), ("teachers_dir", True), ("objective", True)):
        value = cfg.get(key)
        if not isinstance(value, str) and not (optional and value is None):
            raise KdrunError(f"{key} must be a {'string or null' if optional else 'string'}, got {value!r}")
    problem = run_name_problem(cfg.get("name"))
    if problem is not None:
        raise KdrunError(problem)
    seed = cfg.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise KdrunError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
    for name, node in (cfg.get("loss") or {}).items():
        if not isinstance(node, DictConfig):
            continue
        weight = node.get("weight", 1.0)
        if isinstance(weight, (int, float)) and not isinstance(weight, bool) and not (0 <= weight < float("inf")):
            raise KdrunError(f"loss.{name}.weight must be a finite number >= 0, got {weight} "
                             f"(0 turns the term off; a term to maximise needs its own loss class)")
        _at_least(node, f"loss.{name}", "warmup_epochs", 0, None)
        if node.get("warmup_offset", 1) not in (0, 1) or isinstance(node.get("warmup_offset"), bool):
            raise KdrunError(f"loss.{name}.warmup_offset must be 0 (the first epoch's weight is 0) or 1 (it is 1 / "
                             f"warmup_epochs), got {node.get('warmup_offset')!r}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_plan(cfg: ExperimentConfig) -> None:
    """The rules between sections, checked by the planning functions the builder uses."""
    for sname, stage in cfg.stages.items():
        length = stage.epochs if stage.scheduler_interval == "epoch" else stage.max_steps
        for group in plan.group_plans(sname, stage, list(cfg.models), cfg.adapters, cfg.loss):
            _check_optimizer(group, length)
        if stage.align_gradients is not None:
            if stage.align_gradients not in stage.losses:
                raise KdrunError(f"stages.{sname}.align_gradients: '{stage.align_gradients}' is not one of the stage's "
                                 f"losses ({', '.join(stage.losses)}): name the term whose gradient the others must not oppose")
            if stage.co_train:
                raise KdrunError(f"stages.{sname}.align_gradients works on one optimizer group; the stage has co_train groups")
        for dst, src in stage.init_weights.items():
            for role, m in (("model", dst), ("source", src)):
                if m not in cfg.models:
                    raise KdrunError(f"stages.{sname}.init_weights: no {role} '{m}'.{did_you_mean(str(m), cfg.models)} "
                                     f"Models: {', '.join(cfg.models)}.")
            if dst == src:
                raise KdrunError(f"stages.{sname}.init_weights.{dst}: a model cannot start from its own weights")
        if stage.eval is not None and stage.eval not in cfg.models:
            raise KdrunError(f"stages.{sname}.eval: no model '{stage.eval}'.{did_you_mean(stage.eval, cfg.models)}")
    for name, mcfg in cfg.models.items():
        src = mcfg.init_from
        if src is not None and (src not in cfg.models or src == name):
            raise KdrunError(f"{model_key(name)}.init_from: no other model '{src}'.{did_you_mean(str(src), cfg.models)} "
                             f"Models: {', '.join(cfg.models)}.")
        if mcfg.init_noise < 0:
            raise KdrunError(f"{model_key(name)}.init_noise must be >= 0, got {mcfg.init_noise}")
        if mcfg.dtype is not None and mcfg.dtype not in DTYPES:
            raise KdrunError(f"{model_key(name)}.dtype must be one of {', '.join(DTYPES)} or null, got '{mcfg.dtype}'")
    plan.init_order(cfg.models, cfg.models)
    _check_rounds(cfg)
    if cfg.probe is not None:
        if not cfg.probe.models:
            raise KdrunError("probe.models is empty: name the models to probe, e.g. [student]")
        for m in cfg.probe.models:
            if m not in cfg.models:
                raise KdrunError(f"probe.models: no model '{m}'.{did_you_mean(m, cfg.models)} Models: {', '.join(cfg.models)}.")
        if cfg.probe.epochs < 1 or cfg.probe.lr <= 0 or cfg.probe.batch_size < 1:
            raise KdrunError("probe.epochs and probe.batch_size must be at least 1 and probe.lr positive")
    gen = cfg.generation
    if gen is not None:
        for m in gen.models:
            if m not in cfg.models:
                raise KdrunError(f"generation.models: no model '{m}'.{did_you_mean(m, cfg.models)} Models: {', '.join(cfg.models)}.")
        if gen.max_new_tokens < 1 or gen.batch_size < 1 or (gen.do_sample and not gen.seeds) or gen.temperature <= 0:
            raise KdrunError("generation: max_new_tokens and batch_size must be at least 1, temperature positive, and "
                             "sampling (do_sample=true) needs at least one seed")


def _check_optimizer(group: plan.GroupPlan, length: int | None) -> None:
    """Build the group's optimizer (on a stand-in parameter) and scheduler now, so that a bad argument
    (a negative learning rate) is found before any stage trains, not when its stage starts; the
    scheduler is stepped over the stage's ``length`` (epochs or steps; 100 when only the data knows it)
    and its learning rate must stay finite and >= 0."""
    import torch

    from kdrun.build import instantiate_node

    def fail(part: str, ex: Exception) -> KdrunError:
        node = group.optimizer if part == "optimizer" else group.scheduler
        args = ", ".join(f"{k}={v}" for k, v in node.items() if k != "_target_")
        return KdrunError(f"{group.key}.{part} ({args}): {first_line(ex)}")

    param = torch.nn.Parameter(torch.zeros(1))
    try:
        optimizer = instantiate_node(group.optimizer, [param])
        param.grad = torch.ones(1)
        optimizer.step()  # an argument too large for float32 (lr=1e40) fails here, not after a stage's training
    except KdrunError as ex:
        raise KdrunError(f"{group.key}.optimizer: {ex}") from None
    except Exception as ex:
        raise fail("optimizer", ex.__cause__ or ex) from None
    optimizer.zero_grad()
    sched = group.scheduler
    if sched is None:
        return
    target = import_target(sched["_target_"], f"{group.key}.scheduler")
    try:
        arguments = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return
    if any(v is None and k in arguments and k != "total_steps" for k, v in sched.items()):
        return  # a length known only from the data (checked when the stage starts)
    wants = "total_steps" in arguments and sched.get("total_steps") is None
    gamma = sched.get("gamma")
    if isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and not gamma > 0:
        raise KdrunError(f"{group.key}.scheduler.gamma must be positive (the factor the learning rate is multiplied by), got {gamma}")
    milestones = sched.get("milestones")
    if milestones is not None and (not isinstance(milestones, (list, ListConfig)) or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 0 for m in milestones)):
        raise KdrunError(f"{group.key}.scheduler.milestones must be a list of epochs or steps (integers >= 0), got {milestones!r}")
    try:
        scheduler = instantiate_node(sched, optimizer, drop={"total_steps"} if wants else set(),
                                     **({"total_steps": 100} if wants else {}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
            for _ in range(min(int(length or 100), 10_000)):  # the learning rate over the stage: finite, >= 0
                scheduler.step()
                lr = optimizer.param_groups[0]["lr"]
                if not (math.isfinite(lr) and lr >= 0):
                    raise ValueError(f"the learning rate it schedules becomes {lr:g}")
    except KdrunError as ex:
        raise KdrunError(f"{group.key}.scheduler: {ex}") from None
    except Exception as ex:
        raise fail("scheduler", ex.__cause__ or ex) from None


def _complete(cfg: DictConfig) -> DictConfig:
    """Resolved plain copy of ``cfg`` whose fixed sections carry every schema default."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def fill(node: Any, schema: type) -> Any:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.create(OmegaConf.to_container(merged, resolve=True))

    out.data = fill(out.data, DataConfig)
    out.trainer = fill(out.trainer, TrainerConfig)
    for key in ("teacher", "student"):
        if out.get(key) is not None:
            out[key] = fill(out[key], ModelConfig)
    for name in list((out.get("models") or {}).keys()):
        if out.models[name] is not None:
            out.models[name] = fill(out.models[name], ModelConfig)
    for name in list(out.stages.keys()):
        out.stages[name] = fill(out.stages[name], StageConfig)
    for key, schema in (("rounds", RoundsConfig), ("probe", ProbeConfig), ("published", PublishedConfig)):
        if out.get(key) is not None:
            out[key] = fill(out[key], schema)
    return out


def _resolve_all(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as ex:
        raise KdrunError(f"missing value for '{ex.full_key}': set it on the command line ({ex.full_key}=...)") from None
    except OmegaConfBaseException as ex:
        key = getattr(ex, "full_key", None) or "?"
        raise KdrunError(f"cannot resolve '{key}': {first_line(ex)}") from None


def _check_section(cfg: DictConfig, key: str, schema: type) -> None:
    if cfg.get(key) is None:
        raise KdrunError(f"missing section '{key}': select one, e.g. {key}=<option> (see kdrun --help)")
    _check_node(cfg[key], key, schema)


def _check_node(node: Any, prefix: str, schema: type) -> None:
    """Unknown keys (with a suggestion), then types, of ``node`` against the dataclass ``schema``."""
    if not isinstance(node, DictConfig):
        raise KdrunError(f"'{prefix}' must be a mapping of {schema.__name__} keys, got {node!r}")
    fields = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys():
        if key not in fields:
            raise KdrunError(
                f"unknown key '{prefix}.{key}'.{did_you_mean(key, fields)} Valid keys of {prefix}: "
                f"{', '.join(fields)}."
            )
    try:
        OmegaConf.merge(OmegaConf.structured(schema), node)
    except MissingMandatoryValue as ex:
        raise KdrunError(f"missing value for '{prefix}.{ex.full_key}'") from None
    except OmegaConfBaseException as ex:
        sub = getattr(ex, "full_key", "") or ""
        raise KdrunError(f"bad value for '{prefix}.{sub}': {first_line(ex)}") from None
    for name, f in fields.items():
        if f.default is MISSING and f.default_factory is dataclasses.MISSING and name not in node:  # type: ignore[misc]
            raise KdrunError(f"missing key '{prefix}.{name}'")
        if f.type in ("bool", bool) and name in node and not isinstance(node[name], bool):  # OmegaConf reads 2 as true
            raise KdrunError(f"bad value for '{prefix}.{name}': it is true or false, got {node[name]!r}")


def import_target(path: str, key: str) -> Any:
    """Import ``module.attr`` named by a ``_target_`` or raise a KdrunError naming ``key``."""
    module_name, _, attr = str(path).rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as ex:
        raise KdrunError(f"{key}._target_: cannot import module '{module_name}' ({ex})") from None
    if not hasattr(module, attr):
        public = [n for n in dir(module) if not n.startswith("_")]
        raise KdrunError(f"{key}._target_: '{module_name}' has no '{attr}'.{did_you_mean(attr, public)}")
    return getattr(module, attr)


def _check_target(node: Any, key: str, reserved: set[str] = frozenset()) -> Any:  # type: ignore[assignment]
    """Check ``node._target_`` imports and every other key is an argument of it; return the target."""
    if not isinstance(node, DictConfig) or "_target_" not in node:
        raise KdrunError(f"'{key}' needs a '_target_' naming the class or function to build")
    target = import_target(node._target_, key)
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return target
    params = sig.parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    names = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    for arg in node.keys():
        if arg in reserved or str(arg).startswith("_"):
            continue
        if arg not in params and not accepts_any:
            raise KdrunError(
                f"unknown key '{key}.{arg}': {node._target_} takes no argument '{arg}'."
                f"{did_you_mean(arg, names + sorted(reserved - {'_target_'}))} Its arguments: {', '.join(names)}."
            )
    return target


def _check_source(cfg: DictConfig) -> None:
    _check_target(cfg.data.source, "data.source")


def _tensor_owners(cfg: DictConfig, models: dict[str, DictConfig]) -> set[str]:
    return set(models) | {"batch", "adapters"}


def _check_inputs(inputs: Any, key: str, owners: set[str]) -> None:
    def check_name(name: Any, where: str) -> None:
        if not isinstance(name, str) or "." not in name:
            raise KdrunError(f"{where}: '{name}' is not a tensor name; use <model>.<tap>, adapters.<name> or batch.<field>")
        owner = name.split(".", 1)[0]
        if owner not in owners:
            raise KdrunError(
                f"{where}: '{name}' reads from '{owner}', which is not configured.{did_you_mean(owner, owners)} "
                f"Known: {', '.join(sorted(owners))}."
            )

    if not isinstance(inputs, DictConfig):
        raise KdrunError(f"{key}.inputs must map argument names to tensor names, e.g. {{student: student.logits}}")
    for arg, value in inputs.items():
        values = value if isinstance(value, ListConfig) else [value]
        for v in values:
            check_name(v, f"{key}.inputs.{arg}")


def _check_component(node: Any, key: str, reserved: set[str], owners: set[str]) -> None:
    target = _check_target(node, key, reserved)
    if "inputs" not in node:
        raise KdrunError(f"'{key}' needs 'inputs': which tensors feed it, e.g. inputs: {{student: student.logits}}")
    _check_inputs(node.inputs, key, owners)
    if "target" in node and node.target is not None:
        _check_inputs(OmegaConf.create({"target": node.target}), key, owners)
    forward = getattr(target, "forward", None)
    if forward is not None and inspect.isclass(target):
        params = inspect.signature(forward).parameters
        if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            names = [n for n in params if n != "self"]
            for arg in node.inputs.keys():
                if arg not in params:
                    raise KdrunError(
                        f"unknown key '{key}.inputs.{arg}': {node._target_}.forward takes no '{arg}'."
                        f"{did_you_mean(arg, names)} It reads: {', '.join(names)}."
                    )
            missing = [n for n, p in params.items() if n != "self" and p.default is p.empty
                       and p.kind not in (p.VAR_POSITIONAL,) and n not in node.inputs]
            if missing:
                raise KdrunError(f"'{key}.inputs' lacks {', '.join(missing)} (read by {node._target_}.forward)")
    if "weight" in node and not isinstance(node.weight, (int, float)):
        raise KdrunError(f"'{key}.weight' must be a number, got {node.weight!r}")


def _check_stage_nodes(cfg: DictConfig) -> None:
    """Each stage node against the schema: keys, types, targets, and its length."""
    stages = cfg.get("stages")
    if not stages:
        raise KdrunError("no stages configured: choose a recipe with +recipe=NAME (see kdrun --help)")
    for name, scfg in stages.items():
        key = f"stages.{name}"
        if isinstance(scfg, DictConfig) and isinstance(scfg.get("co_train"), DictConfig):
            for gname, gcfg in scfg.co_train.items():  # before the stage, so that a group's unknown key is named
                _check_node(gcfg, f"{key}.co_train.{gname}", CoTrainConfig)
                for part in ("optimizer", "scheduler"):
                    if gcfg.get(part) is not None:
                        _check_target(gcfg[part], f"{key}.co_train.{gname}.{part}")
        _check_node(scfg, key, StageConfig)
        _check_target(scfg.optimizer, f"{key}.optimizer")
        if scfg.get("scheduler") is not None:
            _check_target(scfg.scheduler, f"{key}.scheduler")
        if scfg.get("batch_transform"):
            _check_target(scfg.batch_transform, f"{key}.batch_transform")
        if scfg.get("scheduler_interval", "epoch") not in ("epoch", "step"):
            raise KdrunError(f"{key}.scheduler_interval must be 'epoch' or 'step', got '{scfg.scheduler_interval}'")
        epochs, steps = scfg.get("epochs"), scfg.get("max_steps")
        if epochs is None and steps is None:
            raise KdrunError(f"{key}: set epochs (passes over the training set) or max_steps (optimizer steps), or both")
        for part, value in (("epochs", epochs), ("max_steps", steps)):
            if value is not None and int(value) < 1:
                raise KdrunError(f"{key}.{part} must be at least 1, got {value}")


def _check_rounds(cfg: ExperimentConfig) -> None:
    rounds = cfg.rounds
    if rounds is None:
        return
    if rounds.count < 1:
        raise KdrunError(f"rounds.count must be at least 1, got {rounds.count}")
    for part in ("teacher", "student"):
        name = getattr(rounds, part)
        if name not in cfg.models:
            raise KdrunError(f"rounds.{part}: no model '{name}'.{did_you_mean(name, cfg.models)} Models: {', '.join(cfg.models)}.")
    if rounds.teacher == rounds.student:
        raise KdrunError("rounds.teacher and rounds.student must be different models")
    for term, value in rounds.weights.items():
        if term not in cfg.loss:
            raise KdrunError(f"rounds.weights.{term}: no loss term '{term}'.{did_you_mean(term, cfg.loss)}")
        if not isinstance(value, list) or len(value) != rounds.count \
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise KdrunError(f"rounds.weights.{term} must list one number per round ({rounds.count}), got {value!r}")


def tool_config(args: list[str]) -> DictConfig:
    """The validated config of a kdrun tool's command line (``kdrun-cache``, ``kdrun-select``, ``kdrun-exposure``):
    ``+recipe=NAME`` and overrides, composed as ``kdrun`` would."""
    from kdrun.registry import compose_config

    recipe = next((a.split("=", 1)[1] for a in args if a.startswith("+recipe=")), None)
    return validate(compose_config([a for a in args if not a.startswith("+recipe=")], recipe))
