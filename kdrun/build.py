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
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from kdrun.config import ADAPTER_KEYS, LOSS_KEYS, model_configs, model_key
from kdrun.data.arrays import ArraySplits
from kdrun.data.datasets import DatasetSplits
from kdrun.engine.distributed import DistInfo
from kdrun.errors import KdrunError, did_you_mean
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
class GroupPlan:
    """One optimizer group of a stage: the models, trainable adapters and loss terms it updates.

    ``name`` is ``main`` for the stage's own ``train``/``losses``, else the ``co_train`` key. The
    group's parameters are its models', its adapters' and its terms' own (CRD's embeddings...).
    """

    name: str
    models: list[str]
    adapters: list[str]
    losses: list[str]
    optimizer: Any
    scheduler: Any


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
    groups: list[GroupPlan] = field(default_factory=list)


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
    batch_transform: Any = None  # mixup/cutmix/...: batch -> batch, applied before every model in training

    def fresh_model(self, name: str) -> nn.Module:
        """Model ``name`` as at the start of the run: built, its checkpoint loaded, ``init_from``
        applied (self-distillation rounds restart the student from here)."""
        model = make_model(self.cfg, name, self.device, self.dist)
        mcfg = model_configs(self.cfg)[name]
        if mcfg.get("init_from"):
            init_close_to(model, self.models[mcfg.init_from], float(mcfg.init_noise), model_key(name))
        return model

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
    mname = model_configs(cfg)[name].name
    key = model_key(name)
    from kdrun.paths import recipe_dir

    recipe = f"{cfg.data.name}_baseline"
    train = (f"kdrun +recipe={recipe} student={mname}" if (recipe_dir() / f"{recipe}.yaml").is_file()
             else f"a kdrun run that trains {mname} as its student")
    return (f"Train it with `{train}` and pass {key}.checkpoint=<that run's directory>/student.pt, "
            f"or {key}.checkpoint=null for a randomly initialised {name}.")


def make_model(cfg: DictConfig, name: str, device: torch.device, dist: DistInfo) -> nn.Module:
    """Instantiate model ``name`` and load its ``checkpoint`` (SyncBatchNorm under DDP if asked)."""
    mcfg = model_configs(cfg)[name]
    key = model_key(name)
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
    return model.to(device)


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
        params = dict(model.named_parameters())
        for k, p in params.items():
            if p.is_floating_point():
                p.copy_((p + noise * own[k].to(p.device)) / (1 + noise * noise) ** 0.5)


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
    used_models = {n.split(".", 1)[0] for n in named} | {m for _, s in stage_cfgs for m in _stage_train(s)}
    rounds, probe = cfg.get("rounds"), cfg.get("probe")
    if rounds is not None:
        used_models |= {rounds.teacher, rounds.student}
    if probe is not None:
        used_models.update(probe.models)
    used_models = {m for m in used_models if m in mcfgs}
    for name in list(used_models):  # a model initialised from another needs that one built first
        while mcfgs[name].get("init_from") and mcfgs[name].init_from not in used_models:
            name = mcfgs[name].init_from
            used_models.add(name)
    models = nn.ModuleDict()
    for name in mcfgs:
        if name in used_models:
            models[name] = make_model(cfg, name, device, dist)
    for name in _init_order(mcfgs, models):
        init_close_to(models[name], models[mcfgs[name].init_from], float(mcfgs[name].init_noise), model_key(name))

    # -- tap groups (student.stages -> [student.stage1, ...]) expanded in every input
    taps_of = {name: declared_taps(models[name], dict(mcfgs[name].taps)) for name in models}
    groups = {name: tap_groups(taps_of[name]) for name in models}
    loss_inputs = {n: expand_groups(ins, groups) for n, ins in raw_loss_inputs.items()}
    adapter_inputs = {n: expand_groups(ins, groups) for n, ins in raw_adapter_inputs.items()}

    # -- what every stage reads, expanded through the adapters it uses
    stage_reads: dict[str, tuple[list[str], list[str]]] = {}
    for sname, scfg in stage_cfgs:
        todo = [n for t in _stage_losses(scfg) for n in _names(loss_inputs[t])]
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
        if probe is not None and name in probe.models:
            if probe.tap not in taps_of[name]:
                raise KdrunError(f"probe.tap: {name} has no tap '{probe.tap}'.{did_you_mean(probe.tap, list(taps_of[name]))} "
                                 f"Its taps: {', '.join(taps_of[name])}.")
            wanted.add(probe.tap)
        recorders[name] = TapRecorder(model, name, taps_of[name], wanted)

    # -- stage plans
    stages: list[StagePlan] = []
    trained_so_far: set[str] = set()
    random_models: list[str] = []
    for sname, scfg in stage_cfgs:
        reads, used_adapters = stage_reads[sname]
        train = _stage_train(scfg)
        run = [m for m in models if m in {n.split(".", 1)[0] for n in reads} | set(train)]
        for m in train:
            if m not in {n.split(".", 1)[0] for n in reads}:
                raise KdrunError(f"stages.{sname} trains '{m}' but none of its loss terms reads a tensor of '{m}'")
        frozen = [m for m in run if m not in train]
        for m in frozen:
            if (mcfgs[m].checkpoint is None and not mcfgs[m].get("allow_random") and m not in trained_so_far
                    and m not in random_models and not _teacher_of_later_rounds(cfg, m, loss_inputs)):
                random_models.append(m)
        trained_so_far.update(train)
        groups = _group_plans(sname, scfg, used_adapters)
        stages.append(StagePlan(
            name=str(sname), epochs=int(scfg.epochs), trained_models=train, frozen_models=frozen,
            adapters=used_adapters, losses=_stage_losses(scfg), eval_model=scfg.eval or scfg.train[0], cfg=scfg,
            groups=groups,
        ))

    # -- probe forward: shapes of every tensor any stage reads
    ns = probe_namespace(models, recorders, data, device)
    ns["batch.soft_target"] = torch.nn.functional.one_hot(ns["batch.target"], int(cfg.data.num_classes)).float()
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
    used_terms = {t for _, s in stage_cfgs for t in _stage_losses(s)}
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

    if rounds is not None and rounds.student not in {m for plan in stages for m in plan.trained_models}:
        raise KdrunError(f"rounds.student: no stage trains '{rounds.student}'; name the model the stages train "
                         f"(e.g. rounds.student=student)")
    transform = None
    if cfg.get("batch_transform"):
        try:
            transform = _instantiate(cfg.batch_transform, num_classes=int(cfg.data.num_classes))
        except KdrunError:
            raise
        except Exception as ex:
            raise KdrunError(f"batch_transform: building {cfg.batch_transform._target_} failed: {ex}") from None
    return Pipeline(cfg=cfg, device=device, data=data, models=models, recorders=recorders, adapters=adapters,
                    losses=losses, stages=stages, random_models=random_models, dist=dist,
                    shapes={k: tuple(v.shape) for k, v in ns.items()}, callables=dict(models.items()),
                    batch_transform=transform)


def _init_order(mcfgs: dict[str, DictConfig], models: nn.ModuleDict) -> list[str]:
    """Models with ``init_from``, each after the model it copies (a cycle is a config error)."""
    order: list[str] = []
    for name in models:
        chain, cur = [], name
        while mcfgs[cur].get("init_from") and cur not in order:
            if cur in chain:
                raise KdrunError(f"{model_key(name)}.init_from: the models {' -> '.join(chain + [cur])} initialise each other in a cycle")
            chain.append(cur)
            cur = mcfgs[cur].init_from
        order.extend(reversed([c for c in chain if c not in order]))
    return order


def _stage_train(scfg: DictConfig) -> list[str]:
    """Every model a stage trains: its own ``train`` and its co-trained groups' (adapters excluded)."""
    out = list(scfg.train)
    for gcfg in (scfg.get("co_train") or {}).values():
        out += [m for m in gcfg.train if not str(m).startswith("adapters.")]
    return out


def _stage_losses(scfg: DictConfig) -> list[str]:
    out = list(scfg.losses)
    for gcfg in (scfg.get("co_train") or {}).values():
        out += list(gcfg.losses)
    return out


def _group_plans(sname: str, scfg: DictConfig, used_adapters: list[str]) -> list[GroupPlan]:
    """The stage's optimizer groups; trainable adapters not claimed by a co-trained group are the main group's."""
    co = scfg.get("co_train") or {}
    claimed = {str(m)[len("adapters."):] for g in co.values() for m in g.train if str(m).startswith("adapters.")}
    for a in claimed:
        if a not in used_adapters:
            raise KdrunError(f"stages.{sname}.co_train trains adapters.{a}, which none of the stage's loss terms reads")
    groups = [GroupPlan("main", list(scfg.train), [a for a in used_adapters if a not in claimed], list(scfg.losses),
                        scfg.optimizer, scfg.scheduler)]
    for gname, g in co.items():
        groups.append(GroupPlan(
            str(gname), [m for m in g.train if not str(m).startswith("adapters.")],
            [str(m)[len("adapters."):] for m in g.train if str(m).startswith("adapters.")], list(g.losses),
            g.optimizer if g.optimizer is not None else scfg.optimizer,
            g.scheduler if g.scheduler is not None else scfg.scheduler,
        ))
    return groups


def _teacher_of_later_rounds(cfg: DictConfig, model: str, loss_inputs: dict[str, Inputs]) -> bool:
    """True for a self-distillation teacher that round 1 does not use (every term reading it has
    weight 0 in round 1): it only ever holds a trained student's weights."""
    rounds = cfg.get("rounds")
    if rounds is None or rounds.teacher != model:
        return False
    from kdrun.engine.rounds import round_weight

    readers = [t for t, ins in loss_inputs.items() if any(n.split(".", 1)[0] == model for n in _names(ins))]
    return all(round_weight(rounds, t, 0, float(cfg.loss[t].get("weight", 1.0))) == 0 for t in readers)


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
