"""The config schema and its validation.

Hydra composes the config; :func:`validate` then checks it *before* anything is built, and turns
every mistake into one :class:`~kdrun.errors.KdrunError` that names the key and suggests the closest
valid one. The schema is a set of dataclasses (one per fixed section); sections whose keys depend on
a class (loss terms, adapters, optimizers, data sources) are checked against that class's signature.

Top-level keys::

    name        run name (recipes set it; the run directory is outputs/<name>/<time>)
    objective   the summary value the run returns to Hydra sweepers (best_top1 by default)
    method      method name shown in reports (KD, CRD, ...); "baseline" for a model trained alone
    seed        global seed                      resume  null | auto | PATH
    data        DataConfig                       trainer TrainerConfig
    teacher     ModelConfig or null              student ModelConfig or null
    models      more named models: {name: ModelConfig}
    adapters    {name: {_target_, inputs, target, ...}}   publish ``adapters.<name>``
    loss        {name: {_target_, weight, inputs, warmup_epochs, ...}}
    stages      {name: StageConfig}, run in order
    published   PublishedConfig or null          teachers_dir  where recipes look for teacher weights
    batch_transform  {_target_, ...} or null: mixup/cutmix applied to every training batch (kdrun.data.mix)
    rounds      RoundsConfig or null: self-distillation rounds (student -> next round's teacher)
    probe       ProbeConfig or null: linear-probe evaluation of a model's features after training
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from kdrun.errors import KdrunError, did_you_mean

# ----------------------------------------------------------------------------------------- schema


@dataclass
class ModelConfig:
    """A named model: ``net`` is instantiated with ``_target_``; weights come from ``checkpoint``.

    ``checkpoint`` is a local path, an http(s) URL (downloaded once into ~/.cache/kdrun), or null (random
    initialisation). ``taps`` adds tap names to the model's own (``name: module.path``).
    """

    name: str = MISSING
    net: Any = MISSING
    checkpoint: Optional[str] = None
    strict: bool = True
    taps: dict[str, str] = field(default_factory=dict)
    init_from: Optional[str] = None  # start from another model's weights (after its checkpoint is loaded)
    init_noise: float = 0.0  # eps: w = (w_from + eps * w_fresh) / sqrt(1 + eps^2), w_fresh a new random init
    allow_random: bool = False  # a deliberately random frozen model (Random Teachers): no warning


@dataclass
class DataConfig:
    """A data set of arrays (images uint8 N,C,H,W + labels) with standard augmentation.

    ``source`` is instantiated to :class:`kdrun.data.arrays.ArraySplits` (in-memory arrays, batch
    augmentation by ``crop_padding``/``hflip``, normalisation by ``mean``/``std``) or
    :class:`kdrun.data.datasets.DatasetSplits` (Datasets with their own transforms, DataLoader with
    ``num_workers``); ``root`` is where it reads files. ``subset``: train on the first N examples and evaluate on a proportional slice.
    """

    name: str = MISSING
    num_classes: int = MISSING
    input_shape: list[int] = MISSING  # C, H, W
    root: Optional[str] = None
    subset: Optional[int] = None
    val_split: Optional[int] = None  # hold out N training examples (seeded) and evaluate on them, not the test set
    val_seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 256
    drop_last: bool = False
    num_workers: int = 4  # DataLoader workers (Dataset sources only; arrays need none)
    crop_padding: int = 0
    hflip: bool = False
    mean: list[float] = MISSING
    std: list[float] = MISSING
    source: Any = MISSING


@dataclass
class TrainerConfig:
    """How the engine runs: device, logging, checkpoints, determinism."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    max_epochs: Optional[int] = None  # caps every stage (smoke runs)
    max_steps_per_epoch: Optional[int] = None  # caps the steps of each epoch (smoke tests)
    deterministic: bool = False  # torch.use_deterministic_algorithms + cudnn.deterministic
    log_every: int = 50  # steps between reads of the running losses (the only host syncs)
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    save_every: int = 1  # epochs between `last` checkpoints (the last epoch is always saved)
    save_checkpoints: bool = True  # false: no checkpoints at all (smoke tests, throwaway sweeps)
    progress: str = "auto"  # auto (only on a terminal) | on | off
    tensorboard: bool = True
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    channels_last: bool = False  # NHWC models and batches
    compile: bool = False  # torch.compile every model's training forward
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune
    compile_backend: str = "inductor"
    fused_optimizer: bool = False  # pass fused=True to the optimizer on CUDA when it supports it
    sync_batchnorm: bool = False  # DDP: BatchNorm statistics over the global batch (CUDA only)


@dataclass
class CoTrainConfig:
    """More models trained in the same stage, with their own loss terms, optimizer and schedule
    (online distillation). ``train`` lists model names and ``adapters.<name>`` of trainable adapters;
    ``optimizer``/``scheduler`` default to the stage's (with the stage's settings)."""

    train: list[str] = MISSING
    losses: list[str] = MISSING
    optimizer: Any = None
    scheduler: Any = None


@dataclass
class StageConfig:
    """One stage: which models train, with which loss terms, optimizer and schedule, for how long.

    ``co_train`` adds optimizer groups that train other models in the same steps. Each group's
    parameters receive the gradient of that group's own loss terms only (``share_gradients: true``
    gives every parameter the gradient of the whole weighted total instead).
    """

    epochs: int = MISSING
    train: list[str] = MISSING
    losses: list[str] = MISSING
    eval: Optional[str] = None  # the model whose top-1 is tracked; default: the first of `train`
    optimizer: Any = MISSING
    scheduler: Any = None
    scheduler_interval: str = "epoch"  # epoch | step
    order: int = 0  # stages run by (order, position in the config): an init stage added by a recipe sets -1
    co_train: dict[str, CoTrainConfig] = field(default_factory=dict)
    share_gradients: bool = False


@dataclass
class RoundsConfig:
    """Self-distillation over rounds (born-again networks): every stage runs ``count`` times; after
    round r the ``student``'s weights become the ``teacher``'s and the student starts again from its
    initialisation. ``weights`` overrides loss-term weights per round: ``{term: [w_1, ..., w_count]}``
    (e.g. the ground-truth / teacher balance alpha_r, 1 - alpha_r of Borup & Andersen, "Even your
    Teacher Needs Guidance", NeurIPS 2021)."""

    count: int = MISSING
    teacher: str = "teacher"
    student: str = "student"
    reinit_student: bool = True
    weights: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeConfig:
    """Linear-probe evaluation: a linear classifier trained on the frozen features ``<model>.<tap>``
    of the (unaugmented) training set, tested on the test set, for every model of ``models``, after
    the last stage (of every round). The first model's result is the summary's ``probe_top1``."""

    models: list[str] = field(default_factory=lambda: ["student"])
    tap: str = "feat"
    epochs: int = 30
    lr: float = 0.01
    weight_decay: float = 0.0
    batch_size: int = 512


@dataclass
class PublishedEntry:
    teacher: Optional[str] = None
    student: str = MISSING
    top1: float = MISSING
    note: str = ""


@dataclass
class PublishedConfig:
    """The published numbers a recipe reproduces, per (teacher, student) pair."""

    source: str = MISSING
    metric: str = MISSING  # best | last
    table: list[PublishedEntry] = field(default_factory=list)


OBJECTIVES = ("best_top1", "last_top1", "best_top5", "last_top5", "probe_top1")
TOP_LEVEL_KEYS = {
    "objective", "name", "method", "seed", "resume", "data", "trainer", "teacher", "student", "models",
    "adapters", "loss", "stages", "published", "teachers_dir", "hydra", "batch_transform", "rounds", "probe",
}
LOSS_KEYS = {"_target_", "weight", "inputs", "warmup_epochs"}
ADAPTER_KEYS = {"_target_", "inputs", "target", "trainable"}
RESERVED_MODEL_NAMES = {"batch", "adapters"}


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
    if cfg.get("objective", "best_top1") not in OBJECTIVES:
        raise KdrunError(f"objective must be one of {', '.join(OBJECTIVES)} (the summary value a sweep optimises), "
                         f"got '{cfg.objective}'")
    if cfg.get("objective") == "probe_top1" and cfg.get("probe") is None:
        raise KdrunError("objective=probe_top1 needs a linear probe: set probe (e.g. +probe.models=[student] +probe.tap=feat)")
    _check_section(cfg, "trainer", TrainerConfig)
    if cfg.trainer.get("progress", "auto") not in ("auto", "on", "off"):
        raise KdrunError(f"trainer.progress must be auto, on or off, got '{cfg.trainer.progress}'")
    if cfg.trainer.get("precision", "fp32") not in ("fp32", "bf16", "fp16"):
        raise KdrunError(f"trainer.precision must be fp32, bf16 or fp16, got '{cfg.trainer.precision}'")
    if cfg.get("published") is not None:
        _check_section(cfg, "published", PublishedConfig)
        if cfg.published.metric not in ("best", "last"):
            raise KdrunError(f"published.metric must be 'best' or 'last', got '{cfg.published.metric}'")
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
    _check_stages(cfg, models)
    for name, mcfg in models.items():
        src = mcfg.get("init_from")
        if src is not None and (src not in models or src == name):
            raise KdrunError(f"{model_key(name)}.init_from: no other model '{src}'.{did_you_mean(str(src), models)} "
                             f"Models: {', '.join(models)}.")
        if float(mcfg.get("init_noise", 0.0) or 0.0) < 0:
            raise KdrunError(f"{model_key(name)}.init_noise must be >= 0, got {mcfg.init_noise}")
    if cfg.get("batch_transform"):  # an empty node (batch_transform=none) is no transform
        _check_target(cfg.batch_transform, "batch_transform")
    _check_rounds(cfg, models)
    if cfg.get("probe") is not None:
        _check_node(cfg.probe, "probe", ProbeConfig)
        probe = OmegaConf.merge(OmegaConf.structured(ProbeConfig), cfg.probe)
        if not probe.models:
            raise KdrunError("probe.models is empty: name the models to probe, e.g. [student]")
        for m in probe.models:
            if m not in models:
                raise KdrunError(f"probe.models: no model '{m}'.{did_you_mean(m, models)} Models: {', '.join(models)}.")
        if probe.epochs < 1 or probe.lr <= 0 or probe.batch_size < 1:
            raise KdrunError("probe.epochs and probe.batch_size must be at least 1 and probe.lr positive")
    if cfg.get("resume") not in (None, "auto") and not isinstance(cfg.get("resume"), str):
        raise KdrunError("resume must be null, 'auto' or the path of a run directory or checkpoint")
    return _complete(cfg)


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
        for group in list(out.stages[name].co_train.keys()):
            out.stages[name].co_train[group] = fill(out.stages[name].co_train[group], CoTrainConfig)
    if out.get("rounds") is not None:
        out.rounds = fill(out.rounds, RoundsConfig)
    if out.get("probe") is not None:
        out.probe = fill(out.probe, ProbeConfig)
    if out.get("published") is not None:
        out.published = fill(out.published, PublishedConfig)
    return out


def model_configs(cfg: DictConfig) -> dict[str, DictConfig]:
    """All configured models by name: ``teacher``, ``student`` (when not null) and ``models.*``."""
    out: dict[str, DictConfig] = {}
    for key in ("teacher", "student"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    for name, mcfg in (cfg.get("models") or {}).items():
        if name in out or name in RESERVED_MODEL_NAMES:
            raise KdrunError(f"models.{name}: the name '{name}' is taken; choose another model name")
        if mcfg is not None:
            out[str(name)] = mcfg
    return out


def model_key(name: str) -> str:
    """The config key of model ``name``: ``teacher``, ``student`` or ``models.<name>``."""
    return name if name in ("teacher", "student") else f"models.{name}"


def _resolve_all(cfg: DictConfig) -> None:
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except MissingMandatoryValue as ex:
        raise KdrunError(f"missing value for '{ex.full_key}': set it on the command line ({ex.full_key}=...)") from None
    except OmegaConfBaseException as ex:
        key = getattr(ex, "full_key", None) or "?"
        raise KdrunError(f"cannot resolve '{key}': {_first_line(ex)}") from None


def _first_line(ex: Exception) -> str:
    return str(ex).strip().splitlines()[0] if str(ex).strip() else type(ex).__name__


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
        raise KdrunError(f"bad value for '{prefix}.{sub}': {_first_line(ex)}") from None
    for name, f in fields.items():
        if f.default is MISSING and f.default_factory is dataclasses.MISSING and name not in node:  # type: ignore[misc]
            raise KdrunError(f"missing key '{prefix}.{name}'")


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


def _check_stages(cfg: DictConfig, models: dict[str, DictConfig]) -> None:
    stages = cfg.get("stages")
    if not stages:
        raise KdrunError("no stages configured: choose a recipe with +recipe=NAME (see kdrun --help)")
    losses = set((cfg.get("loss") or {}).keys())
    for name, scfg in stages.items():
        key = f"stages.{name}"
        if isinstance(scfg, DictConfig) and isinstance(scfg.get("co_train"), DictConfig):
            for gname, gcfg in scfg.co_train.items():  # before the stage, so that a group's unknown key is named
                _check_node(gcfg, f"{key}.co_train.{gname}", CoTrainConfig)
        _check_node(scfg, key, StageConfig)
        scfg = OmegaConf.merge(OmegaConf.structured(StageConfig), scfg)
        _check_target(scfg.optimizer, f"{key}.optimizer")
        if scfg.scheduler is not None:
            _check_target(scfg.scheduler, f"{key}.scheduler")
        if scfg.scheduler_interval not in ("epoch", "step"):
            raise KdrunError(f"{key}.scheduler_interval must be 'epoch' or 'step', got '{scfg.scheduler_interval}'")
        if scfg.epochs < 1:
            raise KdrunError(f"{key}.epochs must be at least 1, got {scfg.epochs}")
        if not scfg.train:
            raise KdrunError(f"{key}.train is empty: name the models this stage trains, e.g. [student]")
        adapters = {f"adapters.{a}" for a in (cfg.get("adapters") or {})}
        owner: dict[str, str] = {}  # model -> the group that trains it
        term_owner: dict[str, str] = {}  # loss term -> the group whose objective it is
        groups = [(key, scfg.train, scfg.losses)]
        for gname, gcfg in (scfg.co_train or {}).items():
            gkey = f"{key}.co_train.{gname}"
            for part in ("optimizer", "scheduler"):
                if gcfg.get(part) is not None:
                    _check_target(gcfg[part], f"{gkey}.{part}")
            if not gcfg.train or not gcfg.losses:
                raise KdrunError(f"{gkey} needs 'train' (models it updates) and 'losses' (the terms that update them)")
            groups.append((gkey, gcfg.train, gcfg.losses))
        for gkey, train, terms in groups:
            for m in train:
                if m not in models and not (gkey != key and m in adapters):
                    raise KdrunError(f"{gkey}.train: no model '{m}'.{did_you_mean(m, list(models) + sorted(adapters))} "
                                     f"Models: {', '.join(models)}.")
                if m in owner:
                    raise KdrunError(f"{gkey}.train: '{m}' is already trained by {owner[m]}; a model belongs to one optimizer group")
                owner[m] = gkey
            for term in terms:
                if term not in losses:
                    raise KdrunError(f"{gkey}.losses: no loss term '{term}'.{did_you_mean(term, losses)} Terms: {', '.join(sorted(losses))}.")
                if term in term_owner:
                    raise KdrunError(f"{gkey}.losses: the term '{term}' is already used by {term_owner[term]}; give each group its own terms")
                term_owner[term] = gkey
        if scfg.eval is not None and scfg.eval not in models:
            raise KdrunError(f"{key}.eval: no model '{scfg.eval}'.{did_you_mean(scfg.eval, models)}")


def _check_rounds(cfg: DictConfig, models: dict[str, DictConfig]) -> None:
    if cfg.get("rounds") is None:
        return
    _check_node(cfg.rounds, "rounds", RoundsConfig)
    rounds = OmegaConf.merge(OmegaConf.structured(RoundsConfig), cfg.rounds)
    if rounds.count < 1:
        raise KdrunError(f"rounds.count must be at least 1, got {rounds.count}")
    for part in ("teacher", "student"):
        name = rounds[part]
        if name not in models:
            raise KdrunError(f"rounds.{part}: no model '{name}'.{did_you_mean(name, models)} Models: {', '.join(models)}.")
    if rounds.teacher == rounds.student:
        raise KdrunError("rounds.teacher and rounds.student must be different models")
    losses = set((cfg.get("loss") or {}).keys())
    for term, value in rounds.weights.items():
        if term not in losses:
            raise KdrunError(f"rounds.weights.{term}: no loss term '{term}'.{did_you_mean(term, losses)}")
        if not isinstance(value, ListConfig) or len(value) != rounds.count \
                or not all(isinstance(v, (int, float)) for v in value):
            raise KdrunError(f"rounds.weights.{term} must list one number per round ({rounds.count}), got {value!r}")
