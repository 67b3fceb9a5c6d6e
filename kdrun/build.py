"""Config -> :class:`~kdrun.experiment.Experiment`: data, models with taps, adapters, loss terms, stage plans.

Everything is instantiated here (``_target_`` + :func:`hydra.utils.instantiate`, the only call
site), after :func:`kdrun.config.validate` has checked the config. The phases, in order:

1. :func:`load_data`; 2. :func:`build_models` (checkpoints, ``init_from``); 3. tap groups expanded in
every ``inputs``; 4. :func:`plan_stages` (what each stage reads, runs, trains and freezes; pure, from
:mod:`kdrun.plan`); 5. :func:`hook_models` (forward hooks for the taps something reads);
6. :func:`trace_shapes`: the batch transform and every model in eval mode on two training samples, which
gives the shape of every named tensor; 7. :func:`build_adapters` (``auto`` sizes, a trial forward);
8. :func:`build_losses` (``setup`` with a :class:`~kdrun.component.BuildContext`, ``check_shapes``,
a trial forward). Every shape mismatch is found here, before training starts.
"""
from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Mapping
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdrun import plan
from kdrun.component import BuildContext, Component
from kdrun.config import import_target
from kdrun.data.mix import BatchTransform, OneHotTargets
from kdrun.devices import resolve_device
from kdrun.errors import KdrunError, did_you_mean, first_line
from kdrun.experiment import AdapterSpec, Experiment, LossSpec, StagePlan
from kdrun.model_io import ModelIO
from kdrun.models.frozen import mark_frozen
from kdrun.models.weights import MOSTLY_LOADED, load_weights
from kdrun.names import Inputs, Namespace, describe, field_of, gather, names_of, owner_of, shapes_of
from kdrun.plan import model_key
from kdrun.schema import ExperimentConfig, experiment_config
from kdrun.taps import TapRecorder, declared_taps, expand_groups, tap_groups

log = logging.getLogger("kdrun")

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def instantiate_node(node: Any, *args: Any, drop: set[str] = frozenset(), **kwargs: Any) -> Any:  # type: ignore[assignment]
    """The one place kdrun instantiates ``_target_`` configs (containers converted to Python)."""
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    node = {k: v for k, v in node.items() if k not in drop}
    try:
        return instantiate(node, *args, _convert_="all", **kwargs)
    except InstantiationException as ex:
        if isinstance(ex.__cause__, KdrunError):  # a user mistake found by the target itself
            raise ex.__cause__ from None
        raise


def instantiate_as(key: str, node: Any, **kwargs: Any) -> Any:
    """:func:`instantiate_node`, with a failure of the target turned into one message naming ``key``."""
    try:
        return instantiate_node(node, **kwargs)
    except KdrunError:
        raise
    except Exception as ex:
        cause = ex.__cause__ or ex  # Hydra wraps the target's own error
        raise KdrunError(f"{key}: building {node['_target_']} failed: {first_line(cause)}") from None


def build(cfg: ExperimentConfig | DictConfig, device: torch.device | None = None, sync_batchnorm: bool = False) -> Experiment:
    """Instantiate everything ``cfg`` describes (validated; typed or as :func:`kdrun.config.validate`
    returns it) on ``device`` (default: ``trainer.device``) and check it with a shape trace."""
    if not isinstance(cfg, ExperimentConfig):
        cfg = experiment_config(cfg)
    if device is None:
        device = resolve_device(cfg.trainer.device)
    data = load_data(cfg)
    loss_inputs = {n: c.inputs for n, c in cfg.loss.items()}
    adapter_inputs = {n: c.inputs for n, c in cfg.adapters.items()}
    unloaded: set[str] = set()
    models = build_models(cfg, plan.used_models(cfg, loss_inputs, adapter_inputs), device, sync_batchnorm, unloaded)
    for name in models:
        check_tap_paths(models[name], cfg.models[name].taps, model_key(name))
    check_init_weights(cfg, models)
    taps_of = {name: declared_taps(models[name], cfg.models[name].taps) for name in models}
    groups = {name: tap_groups(taps) for name, taps in taps_of.items()}
    loss_inputs = {n: expand_groups(ins, groups) for n, ins in loss_inputs.items()}
    adapter_inputs = {n: expand_groups(ins, groups) for n, ins in adapter_inputs.items()}
    stages, reads = plan_stages(cfg, list(models), loss_inputs, adapter_inputs)
    reads |= {n for t in cfg.trainer.monitor for n in names_of(loss_inputs[t]) if not n.startswith("batch.")}
    io = hook_models(cfg, models, taps_of, reads)
    transform = build_batch_transform(cfg, reads)
    eval_transform = _eval_side(transform)
    own = {s.name: build_batch_transform(cfg, reads, s.cfg.batch_transform, f"stages.{s.name}.batch_transform")
           for s in stages if s.cfg.batch_transform}
    for s in stages:
        s.batch_transform = own.get(s.name, transform)
        s.eval_transform = _eval_side(s.batch_transform) if s.name in own else eval_transform
    for t in [transform, *own.values()]:  # transforms that run models (rollouts) get them before the trace
        if hasattr(t, "bind"):
            t.bind(BuildContext(shapes={}, num_train=data.num_train, device=device, models=dict(models.items()),
                                seed=int(cfg.seed), teacher_tokenizer=getattr(data, "teacher_tokenizer", None),
                                alignment=getattr(data, "alignment", "identical")), getattr(data, "tokenizer", None))
    # each model is traced on the batches of the stages that run it (a stage's own transform may add the
    # fields it reads, e.g. G2SD's mask noise); models no such stage runs see the run's transform
    runs_own = {m for s in stages if s.name in own for m in s.trained_models + s.frozen_models}
    shared = [m for m in models if m not in runs_own or any(m in s.trained_models + s.frozen_models
                                                           for s in stages if s.name not in own)]
    ns = trace_shapes(models, io, data, transform, device, only=shared)
    for s in stages:
        if s.name in own:
            ns.update(trace_shapes(models, io, data, s.batch_transform, device, only=s.trained_models + s.frozen_models))
    check_model_reads(reads, ns, models, taps_of)
    check_monitor_fields(cfg, loss_inputs, data)
    check_eval_fields({m: io[m] for m in shared}, data, eval_transform)
    for s in stages:
        if s.name in own:
            check_eval_fields({m: io[m] for m in s.trained_models + s.frozen_models}, data, s.eval_transform)
    used_adapters = list(dict.fromkeys(a for s in stages for a in s.adapters))
    used_terms = list(dict.fromkeys([*(t for s in stages for t in s.losses), *cfg.trainer.monitor]))
    adapters = build_adapters(cfg, adapter_inputs, used_adapters, ns, device)
    ctx = dict(num_train=data.num_train, train_labels=getattr(data, "train_labels", None), device=device, models=models,
               seed=int(cfg.seed))
    losses = build_losses(cfg, loss_inputs, used_terms, ns, ctx)
    random = plan.random_models(cfg, [(s.trained_models, s.frozen_models) for s in stages], loss_inputs, unloaded)
    if cfg.rounds is not None and cfg.rounds.student not in {m for s in stages for m in s.trained_models}:
        raise KdrunError(f"rounds.student: no stage trains '{cfg.rounds.student}'; name the model the stages train "
                         f"(e.g. rounds.student=student)")
    return Experiment(cfg=cfg, device=device, data=data, models=models, io=io, adapters=adapters, losses=losses,
                      stages=stages, random_models=random, shapes={k: tuple(v.shape) for k, v in ns.items()
                                                                  if isinstance(v, Tensor)},
                      forwards=dict(models.items()), batch_transform=transform, eval_transform=eval_transform,
                      sync_batchnorm=sync_batchnorm)


# ------------------------------------------------------------------------------------------- data


def check_init_weights(cfg: ExperimentConfig, models: nn.ModuleDict) -> None:
    """Every stage's ``init_weights: {model: source}`` pairs models that share tensors, with equal shapes
    under equal names (checked before any stage runs, so that no stage trains in vain)."""
    for sname, stage in cfg.stages.items():
        for dst, src in stage.init_weights.items():
            target, source = models[dst].state_dict(), models[src].state_dict()
            clash = [k for k, v in target.items() if k in source and source[k].shape != v.shape]
            if clash:
                k = clash[0]
                raise KdrunError(f"stages.{sname}.init_weights.{dst}: {dst}'s {k} is {tuple(target[k].shape)} but {src}'s is "
                                 f"{tuple(source[k].shape)} ({len(clash)} tensors differ); the two must share widths "
                                 f"(e.g. the same encoder dim, depth and patch size)")
            if not any(k in source for k in target):
                raise KdrunError(f"stages.{sname}.init_weights.{dst}: {src} has no tensor of {dst}'s names (e.g. {dst} has "
                                 f"{next(iter(target), 'none')}); the two must share module paths")


def check_tap_paths(model: nn.Module, taps: dict[str, str], key: str) -> None:
    """Every tap a config adds (``<model>.taps.<tap>: module.path``) names a module of the model, used or not."""
    modules = dict(model.named_modules())
    for tap, path in (taps or {}).items():
        if path not in modules:
            raise KdrunError(f"{key}.taps.{tap}: {type(model).__name__} has no module '{path}'."
                             f"{did_you_mean(path, [m for m in modules if m])} (print(model) lists its module paths)")


def load_data(cfg: ExperimentConfig) -> Any:
    """Instantiate ``data.source`` and apply ``data.val_split`` and ``data.subset``."""
    from kdrun.data import is_splits

    d = cfg.data
    splits = instantiate_node(d.source)
    if not is_splits(splits):
        raise KdrunError(f"data.source ({d.source['_target_']}) must return kdrun.data.ArraySplits, "
                         f"kdrun.data.datasets.DatasetSplits or kdrun.data.tensors.TensorSplits, got {type(splits).__name__}")
    sample = splits.sample_batch(1)
    if d.input_shape is not None and "input" in sample and tuple(sample["input"].shape[1:]) != tuple(d.input_shape):
        raise KdrunError(f"data.input_shape is {list(d.input_shape)} but {d.name} inputs are {list(sample['input'].shape[1:])}")
    if d.val_split is not None:
        if getattr(splits, "kept_indices", None) is not None:
            raise KdrunError("data.val_split is not supported with long-tailed data sets (it would change the class counts)")
        try:
            splits = splits.validation_split(d.val_split, d.val_seed)
        except ValueError as ex:
            raise KdrunError(str(ex)) from None
    if d.subset is not None:
        splits = splits.subset(d.subset, d.subset_seed)
    if getattr(d, "selection", None):
        from kdrun.select import open_selection

        before = splits.num_train if hasattr(splits, "num_train") else None
        splits = open_selection(str(d.selection), splits)
        log.info("data.selection=%s: %d of %d training examples kept", d.selection, splits.num_train, before)
    if getattr(d, "meta_split", None) is not None:
        if not hasattr(splits, "meta_split"):
            raise KdrunError(f"data.meta_split works with array data sets (CIFAR, digits, synthetic images); "
                             f"{d.name} is a {type(splits).__name__}")
        try:
            splits = splits.meta_split(d.meta_split, getattr(d, "meta_seed", 0))
        except ValueError as ex:
            raise KdrunError(str(ex)) from None
        log.info("data.meta_split=%d: %d training examples left, %d held out as the meta set (class-stratified, seeded)",
                 d.meta_split, splits.num_train, splits.meta.num_train)
    if getattr(d, "teacher_cache", None):
        from kdrun.data.teacher_cache import open_cache

        splits.cache = open_cache(str(d.teacher_cache), splits, cfg)
        m = splits.cache.manifest
        log.info("data.teacher_cache=%s: %s's top-%d over %d training tokens (%s)", d.teacher_cache, m["model"], m["k"],
                 m["tokens"], m["dtype"])
    _check_labels(cfg, splits, sample.get("input"))
    cover = splits.class_coverage
    if d.subset is not None:
        log.info("data.subset=%d: %d training and %d test examples (seeded, class-stratified), %s", d.subset,
                 splits.num_train, split_size(splits, "test"),
                 "classes not known" if cover["train"] is None else
                 f"{cover['train']} and {cover['test']} of {d.num_classes} classes")
    return splits


def split_size(splits: Any, split: str) -> int:
    """The number of examples of ``split`` (train or test) of any kdrun data set."""
    from kdrun.data.tensors import TensorSplits

    if isinstance(splits, TensorSplits):
        return int(next(iter(getattr(splits, split).values())).shape[0])
    if hasattr(splits, f"{split}_labels"):
        return int(getattr(splits, f"{split}_labels").shape[0])
    return len(getattr(splits, split))


def _check_labels(cfg: ExperimentConfig, splits: Any, sample: Tensor | None) -> None:
    """Class labels inside ``[0, data.num_classes)``; ``data.mean``/``std`` one value per input channel of
    ``sample`` (a batch of inputs, when the data has images)."""
    d = cfg.data
    labels = getattr(splits, "train_labels", None)
    if labels is not None and labels.numel():
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high >= d.num_classes:
            raise KdrunError(f"data.num_classes={d.num_classes}, but {d.name}'s labels run from {low} to {high}: "
                             f"set data.num_classes={max(high + 1, d.num_classes)} (or fix the labels)")
    for key in ("mean", "std"):
        value = getattr(d, key)
        if value is not None and sample is not None and sample.dim() == 4 and len(value) != sample.shape[1]:
            raise KdrunError(f"data.{key} has {len(value)} values but {d.name}'s images have {sample.shape[1]} channels: "
                             f"give one value per channel")
        if key == "std" and value is not None and any(v <= 0 for v in value):
            raise KdrunError(f"data.std must be positive, got {list(value)}")


# ----------------------------------------------------------------------------------------- models


def teacher_hint(cfg: ExperimentConfig, name: str) -> str:
    """How to get weights for model ``name``: the recipe that trains it, or a random teacher."""
    from kdrun.paths import recipe_dir

    mname, key = cfg.models[name].name, model_key(name)
    recipe = f"{cfg.data.name}_baseline"
    train = (f"kdrun +recipe={recipe} student={mname}" if (recipe_dir() / f"{recipe}.yaml").is_file()
             else f"a kdrun run that trains {mname} as its student")
    return (f"Train it with `{train}` and pass {key}.checkpoint=<that run's directory>/student.pt, "
            f"or {key}.checkpoint=null for a randomly initialised {name}.")


def make_model(cfg: ExperimentConfig, name: str, device: torch.device, sync_batchnorm: bool = False,
               unloaded: set[str] | None = None) -> nn.Module:
    """Instantiate model ``name``, load its ``checkpoint``, cast it to its ``dtype`` (SyncBatchNorm if asked).
    A non-strict load that fills fewer than half of its tensors adds ``name`` to ``unloaded``."""
    mcfg, key = cfg.models[name], model_key(name)
    try:
        model = instantiate_as(f"{key}.net", mcfg.net)
    except KdrunError as ex:  # a builder's own message names its keys from 'net' (kdrun.models.hf)
        text = str(ex)
        raise KdrunError(f"{key}.{text}" if text.startswith("net") else text) from None
    mark_frozen(model)
    if sync_batchnorm:
        if device.type != "cuda":
            raise KdrunError("trainer.sync_batchnorm=true needs CUDA devices (SyncBatchNorm does not run on CPU)")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before taps are hooked
    if mcfg.checkpoint is not None:
        filled = load_weights(model, mcfg.checkpoint, f"{key}.checkpoint", strict=mcfg.strict, hint=teacher_hint(cfg, name))
        if filled < MOSTLY_LOADED and unloaded is not None:
            unloaded.add(name)
        log.info("%s: %s weights from %s", name, mcfg.name, mcfg.checkpoint)
    if mcfg.dtype is not None:
        model = model.to(DTYPES[mcfg.dtype])
    return model.to(device)


def trained_model_names(cfg: ExperimentConfig) -> set[str]:
    """The models some stage trains (its ``train`` list or a ``co_train`` group's)."""
    return ({m for st in cfg.stages.values() for m in st.train}
            | {m for st in cfg.stages.values() for g in st.co_train.values() for m in g.train})


def build_models(cfg: ExperimentConfig, names: list[str], device: torch.device, sync_batchnorm: bool,
                 unloaded: set[str] | None = None) -> nn.ModuleDict:
    """The models ``names`` with their checkpoint weights, then ``init_from`` applied in dependency order
    (``unloaded``: collects the models whose non-strict load filled fewer than half of their tensors)."""
    trained = trained_model_names(cfg)  # a frozen teacher keeps its BatchNorm: its statistics never change
    models = nn.ModuleDict({name: make_model(cfg, name, device, sync_batchnorm and name in trained, unloaded)
                            for name in names})
    for name in plan.init_order(cfg.models, models):
        mcfg = cfg.models[name]
        init_close_to(models[name], models[mcfg.init_from], mcfg.init_noise, model_key(name))
    return models


def fresh_model(experiment: Experiment, name: str) -> nn.Module:
    """Model ``name`` as at the start of the run: built, its checkpoint loaded, ``init_from`` applied
    (self-distillation rounds restart the student from here)."""
    cfg = experiment.cfg
    model = make_model(cfg, name, experiment.device, experiment.sync_batchnorm)
    mcfg = cfg.models[name]
    if mcfg.init_from:
        init_close_to(model, experiment.models[mcfg.init_from], mcfg.init_noise, model_key(name))
    return model


@torch.no_grad()
def init_close_to(model: nn.Module, source: nn.Module, noise: float, name: str = "model",
                  fresh: nn.Module | None = None) -> None:
    """Copy ``source``'s weights into ``model``; with ``noise = eps > 0`` move every floating-point
    parameter towards a fresh random initialisation ``w_fresh`` (``fresh``, or ``model``'s own
    weights before the copy), keeping its variance:

    ``w <- (w_source + eps * w_fresh) / sqrt(1 + eps^2)``.

    Buffers (BatchNorm statistics) are copied. Sarnthein et al., "Random Teachers are Good
    Teachers", ICML 2023, show that a student initialised close to its random teacher learns much
    better features; this is the "neighbourhood" initialisation of their code (eps = 0: an exact copy,
    their default).
    """
    own = {k: v.clone() for k, v in (fresh or model).state_dict().items()} if noise > 0 else {}
    src, dst = source.state_dict(), model.state_dict()
    mismatch = [k for k in dst if k not in src or src[k].shape != dst[k].shape]
    if mismatch or len(src) != len(dst):
        raise KdrunError(f"{name}.init_from: {type(model).__name__} and {type(source).__name__} differ in their weights "
                         f"(e.g. {mismatch[:1] or sorted(set(src) - set(dst))[:1]}); init_from needs the same architecture")
    model.load_state_dict(src)
    if noise > 0:
        for k, p in model.named_parameters():
            if p.is_floating_point():
                p.copy_((p + noise * own[k].to(p.device)) / (1 + noise * noise) ** 0.5)


def hook_models(cfg: ExperimentConfig, models: nn.ModuleDict, taps_of: Mapping[str, dict[str, str]],
                reads: set[str]) -> dict[str, ModelIO]:
    """A :class:`ModelIO` per model: its inputs, output names and a recorder of the taps something reads
    (the probe's tap included)."""
    out: dict[str, ModelIO] = {}
    for name, model in models.items():
        wanted = {field_of(n) for n in reads if owner_of(n) == name} & set(taps_of[name])
        if cfg.probe is not None and name in cfg.probe.models:
            if cfg.probe.tap not in taps_of[name]:
                raise KdrunError(f"probe.tap: {name} has no tap '{cfg.probe.tap}'.{did_you_mean(cfg.probe.tap, list(taps_of[name]))} "
                                 f"Its taps: {', '.join(taps_of[name])}.")
            wanted.add(cfg.probe.tap)
        mcfg = cfg.models[name]
        recorder = TapRecorder(model, name, taps_of[name], wanted)
        out[name] = ModelIO(name, recorder, mcfg.inputs, mcfg.outputs, key=model_key(name))
    return out


def _eval_side(transform: Any) -> Any:
    """What evaluation batches get of a training transform: its ``for_eval``, or nothing."""
    return transform.for_eval if isinstance(transform, BatchTransform) else None


def build_batch_transform(cfg: ExperimentConfig, reads: set[str], node: Any = None, key: str = "batch_transform") -> Any:
    """``node`` (default: the run's ``batch_transform``: mixup, cutmix ...), or the one-hot targets when
    a stage reads ``batch.soft_target`` without a mixing transform, or None."""
    node = node if node is not None else cfg.batch_transform
    if node:
        target = import_target(node["_target_"], key)
        try:  # mixing transforms build their soft targets from the class count
            wants = "num_classes" in inspect.signature(target).parameters and "num_classes" not in node
        except (TypeError, ValueError):
            wants = False
        return instantiate_as(key, node, **({"num_classes": int(cfg.data.num_classes)} if wants else {}))
    if "batch.soft_target" in reads:
        return OneHotTargets(int(cfg.data.num_classes))
    return None


# ----------------------------------------------------------------------------------------- stages


def plan_stages(cfg: ExperimentConfig, models: list[str], loss_inputs: Mapping[str, Inputs],
                adapter_inputs: Mapping[str, Inputs]) -> tuple[list[StagePlan], set[str]]:
    """Every stage's plan, and the union of the tensor names the stages read."""
    plans, all_reads = [], set()
    for sname, scfg in plan.ordered_stages(cfg.stages):
        terms = plan.stage_terms(scfg)
        reads, used_adapters = plan.stage_reads(sname, terms, loss_inputs, adapter_inputs)
        train = plan.stage_train(scfg)
        readers = plan.read_models(reads, models)
        for m in train:
            if m not in readers:
                raise KdrunError(f"stages.{sname} trains '{m}' but none of its loss terms reads a tensor of '{m}'")
        run = [m for m in models if m in readers | set(train)]
        groups = plan.group_plans(sname, scfg, models, cfg.adapters, cfg.loss)
        groups = plan.assign_adapters(sname, groups, used_adapters)
        eval_model = scfg.eval or (scfg.train[0] if scfg.train else None)
        plans.append(StagePlan(name=sname, epochs=scfg.epochs, max_steps=scfg.max_steps, trained_models=train,
                               frozen_models=[m for m in run if m not in train], adapters=used_adapters,
                               losses=terms, eval_model=eval_model, cfg=scfg, groups=groups))
        all_reads |= reads
    return plans, all_reads


# ------------------------------------------------------------------------------------- shape trace


def trace_shapes(models: nn.ModuleDict, io: Mapping[str, ModelIO], data: Any, transform: Any,
                 device: torch.device, only: list[str] | None = None) -> Namespace:
    """Run the batch transform and every model (or the models ``only``) in eval mode on two training
    samples; return every named tensor (the global RNG is left as it was)."""
    batch = {k: v.to(device) for k, v in data.sample_batch(2).items()}
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if transform is not None:
            batch = transform(batch)
        ns: Namespace = {f"batch.{k}": v for k, v in batch.items()}
        for name, model in models.items():
            if only is not None and name not in only:
                continue
            was_training = model.training
            model.eval()
            try:
                io[name].run(model, batch, ns)
            except KdrunError:
                raise
            except KeyError as ex:
                raise KdrunError(f"{model_key(name)}.inputs: the batch has no field {ex}; it has "
                                 f"{', '.join(f'batch.{k}' for k in batch)}") from None
            except Exception as ex:
                shapes = {k: tuple(v.shape) for k, v in batch.items() if isinstance(v, Tensor)}
                raise KdrunError(f"{name} ({type(model).__name__}) fails on the batch {shapes}: "
                                 f"{str(ex).splitlines()[0] if str(ex) else type(ex).__name__}") from None
            model.train(was_training)
    return ns


def check_eval_fields(io: Mapping[str, ModelIO], data: Any, eval_transform: Any) -> None:
    """Every batch field a model reads must exist on evaluation batches too (which see no training
    transform, only its ``for_eval``)."""
    fields = set(data.sample_batch(1))
    if eval_transform is not None:
        fields = set(eval_transform({k: v for k, v in data.sample_batch(1).items()}))
    for name, model_io in io.items():
        for read in model_io.reads:
            if read[len("batch."):] not in fields:
                raise KdrunError(f"{model_key(name)}.inputs reads {read}, which evaluation batches lack (they have "
                                 f"{', '.join(f'batch.{f}' for f in sorted(fields))}): a batch transform that adds a field "
                                 f"a model reads must give it for evaluation too, with a for_eval(batch) method "
                                 f"(kdrun.data.mix.BatchTransform)")


def check_monitor_fields(cfg: ExperimentConfig, loss_inputs: Mapping[str, Inputs], data: Any) -> None:
    """Every batch field a monitor (``trainer.monitor``) reads must exist on evaluation batches, where it runs
    (a teacher cache covers the training split only)."""
    test = getattr(data, "test", None)
    fields = (set(test) | {"index"}) if isinstance(test, Mapping) else set(data.sample_batch(1))
    for term in cfg.trainer.monitor:
        for n in names_of(loss_inputs[term]):
            if n.startswith("batch.") and n[len("batch."):] not in fields:
                cache = " (a teacher cache covers the training split only)" if n.startswith("batch.cache_") else ""
                raise KdrunError(f"trainer.monitor: loss.{term} reads {n}, which evaluation batches lack{cache}; they "
                                 f"have {', '.join(f'batch.{f}' for f in sorted(fields))}. Monitor a term that reads "
                                 f"models and evaluation fields")


def check_model_reads(reads: set[str], ns: Namespace, models: nn.ModuleDict, taps_of: Mapping[str, dict[str, str]]) -> None:
    """Every ``<model>.<name>`` a stage reads must be one of the model's taps or outputs."""
    for n in sorted(reads):
        name = owner_of(n)
        if name not in models or n in ns:
            continue
        taps, field = taps_of[name], field_of(n)
        outputs = sorted(field_of(k) for k in ns if owner_of(k) == name and field_of(k) not in taps)
        options = list(taps) + list(tap_groups(taps)) + outputs
        raise KdrunError(
            f"'{n}' is not a tap or an output of {name} ({type(models[name]).__name__}).{did_you_mean(field, options)} "
            f"Its taps: {', '.join(sorted(taps)) or 'none'}; groups: {', '.join(tap_groups(taps)) or 'none'}; "
            f"outputs: {', '.join(outputs) or 'none'}; add a tap with {model_key(name)}.taps.{field}=<module.path>.")


def _require(ns: Namespace, inputs: Inputs, key: str) -> None:
    for n in names_of(inputs):
        if n not in ns:
            hint = " (adapters publish in config order: define it before its readers)" if owner_of(n) == "adapters" else ""
            known = sorted(k for k in ns if owner_of(k) == owner_of(n))
            raise KdrunError(f"{key}: tensor '{n}' is not available{hint}.{did_you_mean(n, known)} "
                             f"Known: {', '.join(known) or 'none'}.")


# ---------------------------------------------------------------------------------------- adapters


def build_adapters(cfg: ExperimentConfig, adapter_inputs: Mapping[str, Inputs], used: list[str], ns: Namespace,
                   device: torch.device) -> dict[str, AdapterSpec]:
    """The adapters some stage uses, in config order (each publishes into ``ns`` for the next)."""
    out: dict[str, AdapterSpec] = {}
    for name in used:
        acfg, inputs = cfg.adapters[name], adapter_inputs[name]
        _require(ns, inputs, f"adapters.{name}")
        node = dict(acfg.node)
        target = ns.get(acfg.target) if acfg.target else None
        if acfg.target and target is None:
            raise KdrunError(f"adapters.{name}.target: '{acfg.target}' is not a tensor read by any stage")
        first = ns[names_of(inputs)[0]]
        for k, v in list(node.items()):
            if v == "auto":
                node[k] = _auto_size(k, first, target, f"adapters.{name}")
        try:
            module = instantiate_node(node).to(device)
            with torch.no_grad():
                module.eval()
                ns[f"adapters.{name}"] = module(**gather(ns, inputs))
        except KdrunError:
            raise
        except Exception as ex:
            raise KdrunError(f"adapters.{name} ({node['_target_']}) cannot use its inputs {describe(ns, inputs)}: "
                             f"{first_line(ex)}") from None
        out[name] = AdapterSpec(name, module, inputs, acfg.trainable)
    return out


def _auto_size(arg: str, first: Tensor, target: Tensor | None, key: str) -> int:
    """Resolve ``auto`` from the traced shapes.

    ``in_*`` reads the adapter's first input, ``out_*`` its ``target`` tensor; ``*_size`` is the
    spatial size (dim 2, height), ``*_dim`` the last dimension (the width of (batch, positions, width)
    hidden states), anything else (channels, features) is dim 1.
    """
    if arg.startswith("in_"):
        tensor = first
    elif arg.startswith("out_"):
        if target is None:
            raise KdrunError(f"{key}.{arg}=auto needs '{key}.target': the tensor whose size it should match")
        tensor = target
    else:
        raise KdrunError(f"{key}.{arg}=auto: only in_* and out_* arguments can be auto")
    if arg.endswith("_size"):
        if tensor.dim() < 3:
            raise KdrunError(f"{key}.{arg}=auto: the tensor has no spatial size (shape {tuple(tensor.shape)})")
        return int(tensor.shape[2])
    if arg.endswith("_dim"):
        return int(tensor.shape[-1])
    return int(tensor.shape[1])


# ------------------------------------------------------------------------------------- loss terms


def build_losses(cfg: ExperimentConfig, loss_inputs: Mapping[str, Inputs], used: list[str], ns: Namespace,
                 ctx: dict[str, Any]) -> dict[str, LossSpec]:
    """The loss terms some stage uses: instantiated, ``setup`` with their build context, shape-checked
    and run once on the traced tensors."""
    out: dict[str, LossSpec] = {}
    for name in (t for t in cfg.loss if t in used):
        lcfg, inputs = cfg.loss[name], loss_inputs[name]
        _require(ns, inputs, f"loss.{name}")
        target = lcfg.node["_target_"]
        module = instantiate_as(f"loss.{name}", lcfg.node)
        shapes = shapes_of(ns, inputs)
        try:
            if isinstance(module, Component):
                module.setup(BuildContext(shapes=shapes, tensor_shapes={k: tuple(v.shape) for k, v in ns.items()
                                                                         if isinstance(v, Tensor)}, inputs=dict(inputs), **ctx))
            if hasattr(module, "check_shapes"):
                module.check_shapes(**shapes)
        except ValueError as ex:
            raise KdrunError(f"loss.{name}: {ex} [inputs: {describe(ns, inputs)}]") from None
        module = module.to(ctx["device"])
        try:
            with torch.no_grad():
                copy.deepcopy(module)(**gather(ns, inputs))
        except Exception as ex:
            raise KdrunError(f"loss.{name} ({target}) cannot use its inputs {describe(ns, inputs)}: {first_line(ex)}") from None
        mean_over, count_field = _mean_over(name, module, inputs)
        out[name] = LossSpec(name, module, lcfg.weight, inputs, lcfg.warmup_epochs, mean_over, count_field, lcfg.warmup_offset)
    return out


def _mean_over(name: str, module: nn.Module, inputs: Inputs) -> tuple[str, str | None]:
    """What the term averages over (its class's ``mean_over``) and, for ``tokens``, the batch field
    whose non-zero entries count them (the term's ``count_input`` argument)."""
    mean_over = getattr(type(module), "mean_over", "samples")
    if mean_over == "samples":
        return "samples", None
    if mean_over != "tokens":
        raise KdrunError(f"loss.{name}: {type(module).__name__}.mean_over must be 'samples' or 'tokens', got {mean_over!r}")
    arg = getattr(type(module), "count_input", "mask")
    source = inputs.get(arg)
    if not isinstance(source, str) or owner_of(source) != "batch":
        raise KdrunError(f"loss.{name}.inputs.{arg}: {type(module).__name__} averages over the tokens of its '{arg}' "
                         f"input, which must be a batch field (e.g. batch.loss_mask), got {source!r}")
    return "tokens", source[len("batch."):]
