"""Planning: which models, adapters and loss terms each stage uses, trains and freezes.

Small pure functions of the typed config (no module is built here). Validation
(:mod:`kdrun.config`) and the builder (:mod:`kdrun.build`) both call them, so that every rule of
stages, optimizer groups, ``init_from`` chains and self-distillation rounds is written once.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
from dataclasses import dataclass
from typing import Any

from kdrun.errors import KdrunError, did_you_mean
from kdrun.names import Inputs, field_of, names_of, owner_of
from kdrun.schema import ExperimentConfig, ModelConfig, RoundsConfig, StageConfig

ADAPTER_PREFIX = "adapters."


def model_key(name: str) -> str:
    """The config key of model ``name``: ``teacher``, ``student`` or ``models.<name>``."""
    return name if name in ("teacher", "student") else f"models.{name}"


def ordered_stages(stages: Mapping[str, StageConfig]) -> list[tuple[str, StageConfig]]:
    """The stages in the order they run: by ``order``, then by position in the config."""
    items = list(stages.items())
    return [items[i] for i in sorted(range(len(items)), key=lambda i: (items[i][1].order, i))]


def stage_train(stage: StageConfig) -> list[str]:
    """Every model a stage trains: its own ``train`` and its co-trained groups' (adapters excluded)."""
    out = list(stage.train)
    for group in stage.co_train.values():
        out += [m for m in group.train if not m.startswith(ADAPTER_PREFIX)]
    return out


def stage_terms(stage: StageConfig) -> list[str]:
    """Every loss term of a stage: its own, then its co-trained groups'."""
    out = list(stage.losses)
    for group in stage.co_train.values():
        out += list(group.losses)
    return out


@dataclass(frozen=True)
class GroupPlan:
    """One optimizer group of a stage: the models, trainable adapters and loss terms it updates.

    ``name`` is ``main`` for the stage's own ``train``/``losses``, else the ``co_train`` key; ``key`` is
    its config key (``stages.main`` or ``stages.main.co_train.peer``). The group's parameters are its
    models', its adapters' and its terms' own (CRD's embeddings...).
    """

    name: str
    key: str
    models: tuple[str, ...]
    adapters: tuple[str, ...]
    losses: tuple[str, ...]
    optimizer: Any
    scheduler: Any


def group_plans(sname: str, stage: StageConfig, models: Iterable[str], adapters: Iterable[str],
                terms: Iterable[str]) -> list[GroupPlan]:
    """The stage's optimizer groups, with the rules of ownership checked: a model or adapter belongs to
    one group, a loss term to one group, co-trained groups may train ``adapters.<name>``. Trainable
    adapters that no co-trained group claims are added to the main group by the builder."""
    models, adapters, terms = list(models), {ADAPTER_PREFIX + a for a in adapters}, set(terms)
    key = f"stages.{sname}"
    specs = [("main", key, list(stage.train), list(stage.losses), stage.optimizer, stage.scheduler)]
    for gname, g in stage.co_train.items():
        gkey = f"{key}.co_train.{gname}"
        if not g.train or not g.losses:
            raise KdrunError(f"{gkey} needs 'train' (models it updates) and 'losses' (the terms that update them)")
        specs.append((gname, gkey, list(g.train), list(g.losses), g.optimizer if g.optimizer is not None else stage.optimizer,
                      g.scheduler if g.scheduler is not None else stage.scheduler))
    owner: dict[str, str] = {}
    term_owner: dict[str, str] = {}
    groups = []
    for gname, gkey, train, losses, optimizer, scheduler in specs:
        for m in train:
            if m not in models and not (gname != "main" and m in adapters):
                raise KdrunError(f"{gkey}.train: no model '{m}'.{did_you_mean(m, models + sorted(adapters))} "
                                 f"Models: {', '.join(models)}.")
            if m in owner:
                raise KdrunError(f"{gkey}.train: '{m}' is already trained by {owner[m]}; a model belongs to one optimizer group")
            owner[m] = gkey
        for t in losses:
            if t not in terms:
                raise KdrunError(f"{gkey}.losses: no loss term '{t}'.{did_you_mean(t, terms)} Terms: {', '.join(sorted(terms))}.")
            if t in term_owner:
                raise KdrunError(f"{gkey}.losses: the term '{t}' is already used by {term_owner[t]}; give each group its own terms")
            term_owner[t] = gkey
        groups.append(GroupPlan(gname, gkey, tuple(m for m in train if not m.startswith(ADAPTER_PREFIX)),
                                tuple(m[len(ADAPTER_PREFIX):] for m in train if m.startswith(ADAPTER_PREFIX)),
                                tuple(losses), optimizer, scheduler))
    return groups


def assign_adapters(sname: str, groups: list[GroupPlan], used_adapters: Iterable[str]) -> list[GroupPlan]:
    """``groups`` with the stage's adapters placed: a co-trained group's claimed ``adapters.<name>`` must
    be read by the stage; every other adapter the stage uses belongs to the main group."""
    used = list(used_adapters)
    claimed = {a for g in groups[1:] for a in g.adapters}
    for a in sorted(claimed):
        if a not in used:
            raise KdrunError(f"stages.{sname}.co_train trains adapters.{a}, which none of the stage's loss terms reads")
    main = dataclasses.replace(groups[0], adapters=tuple(a for a in used if a not in claimed))
    return [main, *groups[1:]]


def stage_reads(sname: str, terms: Iterable[str], loss_inputs: Mapping[str, Inputs],
                adapter_inputs: Mapping[str, Inputs]) -> tuple[set[str], list[str]]:
    """Every tensor name the stage's terms read, closed over the adapters they read (whose inputs are
    read too), and the adapters used, in config order (adapters publish in that order)."""
    todo = [n for t in terms for n in names_of(loss_inputs[t])]
    reads: set[str] = set()
    used: set[str] = set()
    while todo:
        n = todo.pop()
        if n in reads:
            continue
        reads.add(n)
        if owner_of(n) == "adapters":
            a = field_of(n)
            if a not in adapter_inputs:
                raise KdrunError(f"stage '{sname}' reads '{n}' but no adapter '{a}' is configured under adapters")
            used.add(a)
            todo.extend(names_of(adapter_inputs[a]))
    return reads, [a for a in adapter_inputs if a in used]


def read_models(reads: Iterable[str], models: Iterable[str]) -> set[str]:
    """The models whose tensors are among ``reads``."""
    models = set(models)
    return {owner_of(n) for n in reads if owner_of(n) in models}


def used_models(cfg: ExperimentConfig, loss_inputs: Mapping[str, Inputs], adapter_inputs: Mapping[str, Inputs]) -> list[str]:
    """The models the run builds, in config order: those a term or adapter reads, those a stage trains,
    the model a batch transform samples from (a rollout's ``source``: the teacher of sequence-level KD, which no
    term reads; the teacher a rollout mixes in, ``teacher_mix``), the rounds' teacher and student, the probed ones, and every model they are initialised from (by
    ``init_from`` or a stage's ``init_weights``)."""
    named = [n for ins in [*loss_inputs.values(), *adapter_inputs.values()] for n in names_of(ins)]
    used = {owner_of(n) for n in named} | {m for s in cfg.stages.values() for m in stage_train(s)}
    transforms = [cfg.batch_transform, *(s.batch_transform for s in cfg.stages.values())]
    used |= {t["source"] for t in transforms if isinstance(t, Mapping) and isinstance(t.get("source"), str)}
    used |= {"teacher" for t in transforms if isinstance(t, Mapping) and float(t.get("teacher_mix") or 0) > 0}
    if cfg.rounds is not None:
        used |= {cfg.rounds.teacher, cfg.rounds.student}
    if cfg.probe is not None:
        used.update(cfg.probe.models)
    used |= {m for s in cfg.stages.values() for pair in s.init_weights.items() for m in pair}
    used &= set(cfg.models)
    for name in list(used):
        while cfg.models[name].init_from and cfg.models[name].init_from not in used:
            name = cfg.models[name].init_from
            used.add(name)
    return [m for m in cfg.models if m in used]


def init_order(models: Mapping[str, ModelConfig], built: Iterable[str]) -> list[str]:
    """The built models with ``init_from``, each after the model it copies (a cycle is a config error)."""
    order: list[str] = []
    for name in built:
        chain, cur = [], name
        while models[cur].init_from and cur not in order:
            if cur in chain:
                raise KdrunError(f"{model_key(name)}.init_from: the models {' -> '.join(chain + [cur])} initialise "
                                 f"each other in a cycle")
            chain.append(cur)
            cur = models[cur].init_from  # type: ignore[assignment]
        order.extend(reversed([c for c in chain if c not in order]))
    return order


def round_weight(rounds: RoundsConfig | None, term: str, r: int, base: float) -> float:
    """The weight of loss term ``term`` in round ``r`` (0-based): ``rounds.weights[term][r]`` when
    given, else the term's own ``weight`` (``base``)."""
    value = rounds.weights.get(term) if rounds is not None else None
    return float(value[r]) if value is not None else float(base)


def round_weights(cfg: ExperimentConfig, r: int) -> dict[str, float]:
    """Every term's weight in round ``r`` (terms without a per-round list keep their weight)."""
    return {t: round_weight(cfg.rounds, t, r, c.weight) for t, c in cfg.loss.items()}


def later_round_teacher(cfg: ExperimentConfig, model: str, loss_inputs: Mapping[str, Inputs]) -> bool:
    """True for a self-distillation teacher that round 1 does not use (every term reading it has
    weight 0 in round 1): it only ever holds a trained student's weights."""
    if cfg.rounds is None or cfg.rounds.teacher != model:
        return False
    readers = [t for t, ins in loss_inputs.items() if any(owner_of(n) == model for n in names_of(ins))]
    return all(round_weight(cfg.rounds, t, 0, cfg.loss[t].weight) == 0 for t in readers)


def random_models(cfg: ExperimentConfig, stages: Iterable[tuple[list[str], list[str]]],
                  loss_inputs: Mapping[str, Inputs], unloaded: Iterable[str] = ()) -> list[str]:
    """Models used frozen somewhere that are neither loaded from a checkpoint nor trained by an
    earlier stage (nor marked ``allow_random``, nor a later round's teacher): random teachers. A model
    that a later stage trains is a student waiting for its stage (FT's init stage runs the student
    frozen), not a teacher.

    ``stages``: per stage in run order, (trained models, frozen models); ``unloaded``: models whose
    checkpoint filled fewer than half of their tensors (a non-strict load of the wrong file), random too."""
    stages, unloaded = list(stages), set(unloaded)
    trained: set[str] = set()
    out: list[str] = []
    for i, (train, frozen) in enumerate(stages):
        later = {m for t, _ in stages[i + 1:] for m in t}
        for m in frozen:
            mcfg = cfg.models[m]
            if ((mcfg.checkpoint is None or m in unloaded) and not mcfg.allow_random and m not in trained and m not in later
                    and m not in out and not later_round_teacher(cfg, m, loss_inputs)):
                out.append(m)
        trained.update(train)
    return out
