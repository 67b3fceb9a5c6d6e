"""Config -> :class:`Pipeline`: data, models with taps, adapters, loss terms and stage plans.

Everything is instantiated here (``_target_`` + :func:`hydra.utils.instantiate`, the only call
site), after :func:`kdrun.config.validate` has checked the config. A probe forward of every model
on two training images gives the shape of every tensor, which resolves ``auto`` sizes of adapters,
sizes the loss terms' own modules (``setup``) and finds any shape mismatch before training starts.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor, nn

from kdrun.config import ADAPTER_KEYS, LOSS_KEYS, model_configs
from kdrun.data.arrays import ArraySplits
from kdrun.data.datasets import DatasetSplits
from kdrun.engine.distributed import DistInfo
from kdrun.errors import KdrunError
from kdrun.models.weights import load_weights
from kdrun.taps import TapRecorder, declared_taps, expand_groups, tap_groups

log = logging.getLogger("kdrun")

Inputs = dict[str, "str | list[str]"]


@dataclass
class LossSpec:
    """A weighted loss term reading named tensors (``inputs``: forward argument -> name(s))."""

    name: str
    module: nn.Module
    weight: float
    inputs: Inputs
    warmup_epochs: int = 0


@dataclass
class AdapterSpec:
    """A module fed by named tensors that publishes ``adapters.<name>``."""

    name: str
    module: nn.Module
    inputs: Inputs
    trainable: bool = True


@dataclass
class StagePlan:
    """What one stage runs: models (frozen ones first), adapters in order, loss terms, what trains."""

    name: str
    epochs: int
    trained_models: list[str]
    frozen_models: list[str]
    adapters: list[str]
    losses: list[str]
    eval_model: str
    cfg: DictConfig


@dataclass
class Pipeline:
    """Everything the engine needs, built from a config."""

    cfg: DictConfig
    device: torch.device
    data: ArraySplits | DatasetSplits
    models: nn.ModuleDict
    recorders: dict[str, TapRecorder]
    adapters: dict[str, AdapterSpec]
    losses: dict[str, LossSpec]
    stages: list[StagePlan]
    dist: DistInfo = field(default_factory=DistInfo)
    random_models: list[str] = field(default_factory=list)  # frozen somewhere, never loaded nor trained
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    callables: dict[str, Any] = field(default_factory=dict)  # what the step calls per model (compiled or not)

    def modules(self) -> nn.ModuleDict:
        """Every stateful module by kind, for checkpoints: models, adapters, loss terms."""
        return nn.ModuleDict({
            "models": self.models,
            "adapters": nn.ModuleDict({k: a.module for k, a in self.adapters.items()}),
            "losses": nn.ModuleDict({k: s.module for k, s in self.losses.items()}),
        })


def resolve_device(name: str, dist: DistInfo | None = None) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; an unavailable device is a clear error. Under DDP a
    CUDA device is the process's local rank."""
    if dist is not None and dist.enabled and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", dist.local_rank)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise KdrunError(f"trainer.device: unknown device '{name}'; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KdrunError("trainer.device=cuda but no CUDA device is available; use trainer.device=cpu or auto")
    return dev


def _instantiate(node: Any, *args: Any, drop: set[str] = frozenset(), **kwargs: Any) -> Any:  # type: ignore[assignment]
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


def _names(inputs: Inputs) -> list[str]:
    out: list[str] = []
    for v in inputs.values():
        out.extend(v if isinstance(v, list) else [v])
    return out


def _gather(ns: dict[str, Tensor], inputs: Inputs) -> dict[str, Any]:
    return {arg: [ns[n] for n in v] if isinstance(v, list) else ns[v] for arg, v in inputs.items()}


def _shape_of(ns: dict[str, Tensor], inputs: Inputs) -> dict[str, Any]:
    return {arg: [ns[n].shape for n in v] if isinstance(v, list) else ns[v].shape for arg, v in inputs.items()}


def _describe(ns: dict[str, Tensor], inputs: Inputs) -> str:
    parts = []
    for arg, v in inputs.items():
        for n in v if isinstance(v, list) else [v]:
            parts.append(f"{arg}={n} {tuple(ns[n].shape)}")
    return ", ".join(parts)


def load_data(cfg: DictConfig) -> ArraySplits | DatasetSplits:
    """Instantiate ``data.source`` and apply ``data.subset``."""
    splits = _instantiate(cfg.data.source)
    if not isinstance(splits, (ArraySplits, DatasetSplits)):
        raise KdrunError(f"data.source ({cfg.data.source._target_}) must return kdrun.data.ArraySplits or "
                         f"kdrun.data.datasets.DatasetSplits, got {type(splits).__name__}")
    shape = tuple(splits.probe_batch(1)[0].shape[1:])
    if shape != tuple(cfg.data.input_shape):
        raise KdrunError(f"data.input_shape is {list(cfg.data.input_shape)} but {cfg.data.name} images are {list(shape)}")
    if cfg.data.val_split is not None:
        if getattr(splits, "kept_indices", None) is not None:
            raise KdrunError("data.val_split is not supported with long-tailed data sets (it would change the class counts)")
        try:
            splits = splits.validation_split(cfg.data.val_split, cfg.data.val_seed)
        except ValueError as ex:
            raise KdrunError(str(ex)) from None
    if cfg.data.subset is not None:
        splits = splits.subset(cfg.data.subset)
    return splits


def ordered_stages(cfg: DictConfig) -> list[tuple[str, DictConfig]]:
    """The stages in the order they run: by ``order``, then by position in the config."""
    items = list(cfg.stages.items())
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (int(items[i][1].get("order", 0) or 0), i))]


def teacher_hint(cfg: DictConfig, name: str) -> str:
    """How to get weights for model ``name``: the recipe that trains it, or a random teacher."""
    mname = cfg[name].name if name in ("teacher", "student") else cfg.models[name].name
    key = name if name in ("teacher", "student") else f"models.{name}"
    from kdrun.paths import recipe_dir

    recipe = f"{cfg.data.name}_baseline"
    train = (f"kdrun +recipe={recipe} student={mname}" if (recipe_dir() / f"{recipe}.yaml").is_file()
             else f"a kdrun run that trains {mname} as its student")
    return (f"Train it with `{train}` and pass {key}.checkpoint=<that run's directory>/student.pt, "
            f"or {key}.checkpoint=null for a randomly initialised {name}.")


def build(cfg: DictConfig, dist: DistInfo | None = None) -> Pipeline:
    """Instantiate everything ``cfg`` describes (already validated) and check it with a probe forward."""
    dist = dist or DistInfo()
    device = resolve_device(cfg.trainer.device, dist)
    data = load_data(cfg)
    mcfgs = model_configs(cfg)
    stage_cfgs = ordered_stages(cfg)
    adapter_cfgs = cfg.get("adapters") or {}
    loss_cfgs = cfg.loss

    # -- models (only those some stage uses), with their checkpoint weights
    raw_loss_inputs = {n: OmegaConf.to_container(c.inputs, resolve=True) for n, c in loss_cfgs.items()}
    raw_adapter_inputs = {n: OmegaConf.to_container(c.inputs, resolve=True) for n, c in adapter_cfgs.items()}
    named = [n for ins in [*raw_loss_inputs.values(), *raw_adapter_inputs.values()] for n in _names(ins)]
    used_models = {n.split(".", 1)[0] for n in named} | {m for _, s in stage_cfgs for m in s.train}
    models = nn.ModuleDict()
    for name in mcfgs:
        if name not in used_models:
            continue
        mcfg = mcfgs[name]
        key = name if name in ("teacher", "student") else f"models.{name}"
        try:
            model = _instantiate(mcfg.net)
        except KdrunError:
            raise
        except Exception as ex:
            raise KdrunError(f"{key}.net: building {mcfg.net._target_} failed: {ex}") from None
        if cfg.trainer.sync_batchnorm and dist.enabled:
            if device.type != "cuda":
                raise KdrunError("trainer.sync_batchnorm=true needs CUDA devices (SyncBatchNorm does not run on CPU)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # before taps are hooked
        if mcfg.checkpoint is not None:
            load_weights(model, mcfg.checkpoint, f"{key}.checkpoint", strict=mcfg.strict, hint=teacher_hint(cfg, name))
            log.info("%s: %s weights from %s", name, mcfg.name, mcfg.checkpoint)
        models[name] = model.to(device)

    # -- tap groups (student.stages -> [student.stage1, ...]) expanded in every input
    taps_of = {name: declared_taps(models[name], dict(mcfgs[name].taps)) for name in models}
    groups = {name: tap_groups(taps_of[name]) for name in models}
    loss_inputs = {n: expand_groups(ins, groups) for n, ins in raw_loss_inputs.items()}
    adapter_inputs = {n: expand_groups(ins, groups) for n, ins in raw_adapter_inputs.items()}

    # -- what every stage reads, expanded through the adapters it uses
    stage_reads: dict[str, tuple[list[str], list[str]]] = {}
    for sname, scfg in stage_cfgs:
        todo = [n for t in scfg.losses for n in _names(loss_inputs[t])]
        reads, used_adapters = set(), []
        while todo:
            n = todo.pop()
            if n in reads:
                continue
            reads.add(n)
            owner, _, rest = n.partition(".")
            if owner == "adapters":
                if rest not in adapter_cfgs:
                    raise KdrunError(f"stage '{sname}' reads '{n}' but no adapter '{rest}' is configured under adapters")
                used_adapters.append(rest)
                todo.extend(_names(adapter_inputs[rest]))
        ordered_adapters = [a for a in adapter_cfgs if a in used_adapters]
        stage_reads[sname] = (sorted(reads), ordered_adapters)

    # -- tap hooks: only the taps something reads
    recorders: dict[str, TapRecorder] = {}
    all_reads = {n for reads, _ in stage_reads.values() for n in reads}
    for name, model in models.items():
        wanted = {n.split(".", 1)[1] for n in all_reads if n.split(".", 1)[0] == name} - {"logits"}
        recorders[name] = TapRecorder(model, name, taps_of[name], wanted)

    # -- stage plans
    stages: list[StagePlan] = []
    trained_so_far: set[str] = set()
    random_models: list[str] = []
    for sname, scfg in stage_cfgs:
        reads, used_adapters = stage_reads[sname]
        run = [m for m in models if m in {n.split(".", 1)[0] for n in reads} | set(scfg.train)]
        for m in scfg.train:
            if m not in {n.split(".", 1)[0] for n in reads}:
                raise KdrunError(f"stages.{sname} trains '{m}' but none of its loss terms reads a tensor of '{m}'")
        frozen = [m for m in run if m not in scfg.train]
        for m in frozen:
            if mcfgs[m].checkpoint is None and m not in trained_so_far and m not in random_models:
                random_models.append(m)
        trained_so_far.update(scfg.train)
        stages.append(StagePlan(
            name=str(sname), epochs=int(scfg.epochs), trained_models=list(scfg.train), frozen_models=frozen,
            adapters=used_adapters, losses=list(scfg.losses), eval_model=scfg.eval or scfg.train[0], cfg=scfg,
        ))

    # -- probe forward: shapes of every tensor any stage reads
    ns = probe_namespace(models, recorders, data, device)
    adapters: dict[str, AdapterSpec] = {}
    used_anywhere = {a for _, ads in stage_reads.values() for a in ads}
    for name, acfg in adapter_cfgs.items():
        if name not in used_anywhere:
            continue
        inputs = adapter_inputs[name]
        _require(ns, inputs, f"adapters.{name}")
        node = OmegaConf.to_container(acfg, resolve=True)
        first = ns[_names(inputs)[0]]
        target = ns.get(node.get("target")) if node.get("target") else None
        if node.get("target") and target is None:
            raise KdrunError(f"adapters.{name}.target: '{node['target']}' is not a tensor read by any stage")
        for k, v in list(node.items()):
            if v == "auto":
                node[k] = _auto_size(k, first, target, f"adapters.{name}")
        try:
            module = _instantiate(node, drop=ADAPTER_KEYS - {"_target_"}).to(device)
            with torch.no_grad():
                module.eval()
                ns[f"adapters.{name}"] = module(**_gather(ns, inputs))
        except KdrunError:
            raise
        except Exception as ex:
            raise KdrunError(f"adapters.{name} ({node['_target_']}) cannot use its inputs {_describe(ns, inputs)}: {str(ex).splitlines()[0]}") from None
        adapters[name] = AdapterSpec(name, module, inputs, bool(node.get("trainable", True)))

    losses: dict[str, LossSpec] = {}
    used_terms = {t for _, s in stage_cfgs for t in s.losses}
    for name, lcfg in loss_cfgs.items():
        if name not in used_terms:
            continue
        inputs = loss_inputs[name]
        _require(ns, inputs, f"loss.{name}")
        try:
            module = _instantiate(lcfg, drop=LOSS_KEYS - {"_target_"})
        except Exception as ex:
            raise KdrunError(f"loss.{name}: building {lcfg._target_} failed: {ex}") from None
        shapes = _shape_of(ns, inputs)
        try:
            if hasattr(module, "setup"):
                extra = {}
                if "train_labels" in inspect.signature(module.setup).parameters and isinstance(data, ArraySplits):
                    extra["train_labels"] = data.train_labels  # lets CRD exclude same-class negatives from step 1
                module.setup(shapes, data.num_train, **extra)
            if hasattr(module, "check_shapes"):
                module.check_shapes(**shapes)
        except ValueError as ex:
            raise KdrunError(f"loss.{name}: {ex} [inputs: {_describe(ns, inputs)}]") from None
        module = module.to(device)
        try:
            with torch.no_grad():
                copy.deepcopy(module)(**_gather(ns, inputs))
        except Exception as ex:
            raise KdrunError(f"loss.{name} ({lcfg._target_}) cannot use its inputs {_describe(ns, inputs)}: {str(ex).splitlines()[0]}") from None
        losses[name] = LossSpec(name, module, float(lcfg.get("weight", 1.0)), inputs, int(lcfg.get("warmup_epochs", 0) or 0))

    return Pipeline(cfg=cfg, device=device, data=data, models=models, recorders=recorders, adapters=adapters,
                    losses=losses, stages=stages, random_models=random_models, dist=dist,
                    shapes={k: tuple(v.shape) for k, v in ns.items()}, callables=dict(models.items()))


def _require(ns: dict[str, Tensor], inputs: Inputs, key: str) -> None:
    for n in _names(inputs):
        if n not in ns:
            owner = n.split(".", 1)[0]
            hint = " (adapters publish in config order: define it before its readers)" if owner == "adapters" else ""
            raise KdrunError(f"{key}: tensor '{n}' is not available{hint}")


def _auto_size(arg: str, first: Tensor, target: Tensor | None, key: str) -> int:
    """Resolve ``auto`` from the probe shapes.

    ``in_*`` reads the adapter's first input, ``out_*`` its ``target`` tensor; ``*_size`` is the
    spatial size (dim 2, height), anything else (channels, features, dim) is dim 1.
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
    return int(tensor.shape[1])


def probe_namespace(models: nn.ModuleDict, recorders: dict[str, TapRecorder], data: ArraySplits | DatasetSplits,
                    device: torch.device) -> dict[str, Tensor]:
    """Run every model in eval mode on two images; return every tensor by name."""
    x, y = data.probe_batch(2)
    x, y = x.to(device), y.to(device)
    ns: dict[str, Tensor] = {"batch.input": x, "batch.target": y, "batch.index": torch.arange(len(y), device=device)}
    with torch.no_grad():
        for name, model in models.items():
            was_training = model.training
            model.eval()
            try:
                out = model(x)
            except Exception as ex:
                raise KdrunError(f"{name} ({type(model).__name__}) fails on input {tuple(x.shape)}: {str(ex).splitlines()[0]}") from None
            model.train(was_training)
            ns[f"{name}.logits"] = out
            for tap, t in recorders[name].pop().items():
                ns[f"{name}.{tap}"] = t
    return ns
