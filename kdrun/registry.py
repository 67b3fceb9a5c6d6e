"""Registers the shipped config groups that are not plain folders of the primary config dir:

- ``recipe``: every ``recipes/*.yaml`` (package ``_global_``), so ``+recipe=NAME`` works in wheel and
  editable installs alike (see docs/architecture.md);
- ``teacher`` and ``student``: every ``configs/model/*.yaml``, so ``teacher=resnet56 student=resnet20``
  select zoo models (the ``model`` group itself stays available for ``+model@models.NAME=...``).

User recipe folders join through Hydra's search path: ``hydra.searchpath=[file:///my/configs]`` with
recipes in ``/my/configs/recipe/NAME.yaml``.
"""
from __future__ import annotations

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from pathlib import Path

from kdrun.config import ModelConfig
from kdrun.errors import KdrunError
from kdrun.paths import config_dir, recipe_dir

_done = False


def pick(key: str, table: dict, default: object = None) -> object:
    """Resolver ``${pick:KEY,{k1: v1, k2: v2},DEFAULT}``: the value for KEY in the table, else DEFAULT.

    Recipes use it for per-pair settings, e.g. ``lr: ${pick:${student.name},{mobilenetv2: 0.01},0.05}``.
    """
    return table.get(key, default)


def with_schema_defaults(node: DictConfig, schema: type) -> DictConfig:
    """``node`` with the schema's defaults for the keys it lacks (interpolations kept), so that
    every key can be overridden on the command line without a ``+``."""
    merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    return OmegaConf.create(OmegaConf.to_container(merged, resolve=False))


def complete_recipe(recipe: DictConfig) -> DictConfig:
    """A recipe whose stages and loss terms carry every default key (``eval``, ``weight``, ...)."""
    for name in list((recipe.get("stages") or {}).keys()):
        stage = recipe.stages[name]
        for key, value in (("eval", None), ("scheduler_interval", "epoch"), ("order", 0), ("share_gradients", False)):
            if key not in stage:
                stage[key] = value
        for group in (stage.get("co_train") or {}).values():
            for key in ("optimizer", "scheduler"):
                if key not in group:
                    group[key] = None
    for name in list((recipe.get("loss") or {}).keys()):
        term = recipe.loss[name]
        for key, value in (("weight", 1.0), ("warmup_epochs", 0)):
            if key not in term:
                term[key] = value
    return recipe


def _load(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as ex:  # YAML syntax errors of every kind
        raise KdrunError(f"{path}: not valid YAML: {' '.join(str(ex).split())[:300]}") from None


def register_configs() -> None:
    """Idempotently put the recipe, teacher and student groups into Hydra's ConfigStore."""
    global _done
    if _done:
        return
    if not OmegaConf.has_resolver("pick"):
        OmegaConf.register_new_resolver("pick", pick)
    cs = ConfigStore.instance()
    for path in sorted((config_dir() / "model").glob("*.yaml")):
        node = with_schema_defaults(_load(path), ModelConfig)
        cs.store(group="teacher", name=path.stem, node=node)
        cs.store(group="student", name=path.stem, node=node)
    for path in sorted(recipe_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=complete_recipe(_load(path)), package="_global_")
    _done = True
