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
from omegaconf import OmegaConf

from kdrun.paths import config_dir, recipe_dir

_done = False


def pick(key: str, table: dict, default: object = None) -> object:
    """Resolver ``${pick:KEY,{k1: v1, k2: v2},DEFAULT}``: the value for KEY in the table, else DEFAULT.

    Recipes use it for per-pair settings, e.g. ``lr: ${pick:${student.name},{mobilenetv2: 0.01},0.05}``.
    """
    return table.get(key, default)


def register_configs() -> None:
    """Idempotently put the recipe, teacher and student groups into Hydra's ConfigStore."""
    global _done
    if _done:
        return
    if not OmegaConf.has_resolver("pick"):
        OmegaConf.register_new_resolver("pick", pick)
    cs = ConfigStore.instance()
    for path in sorted((config_dir() / "model").glob("*.yaml")):
        node = OmegaConf.load(path)
        cs.store(group="teacher", name=path.stem, node=node)
        cs.store(group="student", name=path.stem, node=node)
    for path in sorted(recipe_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=OmegaConf.load(path), package="_global_")
    _done = True
