"""Registers the shipped config groups that are not plain folders of the primary config dir:

- ``recipe``: every ``recipes/*.yaml`` (package ``_global_``), so ``+recipe=NAME`` works in wheel and
  editable installs alike (see docs/architecture.md);
- ``model``, ``teacher`` and ``student``: every zoo model registered with
  :func:`kdrun.models.zoo.register_model`, and every ``configs/model/*.yaml`` (models that are not
  kdrun's own, such as torchvision's, with their taps), so ``teacher=resnet56 student=resnet20`` and
  ``model@models.NAME=resnet20`` select them.

User recipe folders join through Hydra's search path: ``hydra.searchpath=[file:///my/configs]`` with
recipes in ``/my/configs/recipe/NAME.yaml``.
"""
from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from kdrun._hydra_compat import install_fast_help
from kdrun.schema import AdapterConfig, CoTrainConfig, LossTermConfig, ModelConfig, StageConfig, fill_defaults
from kdrun.errors import KdrunError, did_you_mean
from kdrun.models.zoo import zoo
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
    """A recipe whose stages, co-trained groups, loss terms, adapters and models carry every default key
    of the schema (``eval``, ``max_steps``, ``weight`` ...), so that each can be overridden without ``+``.

    Only the nodes a recipe defines are filled (:func:`kdrun.schema.fill_defaults`); a partial override
    of an inherited node is left as written, so that it changes only the keys it names."""
    for stage in (recipe.get("stages") or {}).values():
        fill_defaults(stage, StageConfig)
        for group in (stage.get("co_train") or {}).values() if isinstance(stage, DictConfig) else ():
            fill_defaults(group, CoTrainConfig)
    for schema, section in ((LossTermConfig, "loss"), (AdapterConfig, "adapters"), (ModelConfig, "models")):
        for node in (recipe.get(section) or {}).values():
            partial = section == "models" and isinstance(node, DictConfig) and not _defines_model(node)
            before = set(node) if partial else set()
            fill_defaults(node, schema)
            if partial:  # an override of a model from the defaults list (`/model@models.x`): its file's keys stay
                for key in ("name", "inputs", "outputs", "taps"):
                    if key not in before and key in node:
                        del node[key]
    return recipe


def _defines_model(node: object) -> bool:
    """Whether a ``models.<name>`` node of a recipe is a whole model (its ``net`` has a ``_target_``)."""
    net = node.get("net") if isinstance(node, DictConfig) else None
    return isinstance(net, DictConfig) and "_target_" in net


def model_node(name: str) -> DictConfig:
    """The config node of zoo model ``name`` (a registered builder or ``configs/model/<name>.yaml``),
    with the schema's defaults for the keys it lacks."""
    path = config_dir() / "model" / f"{name}.yaml"
    entries = zoo()
    if name in entries and path.is_file():
        raise KdrunError(f"{path}: the zoo model '{name}' is also registered by {entries[name].target}; rename one")
    if name in entries:
        node = OmegaConf.create(entries[name].node())
    elif path.is_file():
        node = _load(path)
    else:
        raise KdrunError(f"no zoo model '{name}'.{did_you_mean(name, list(entries))}")
    return with_schema_defaults(node, ModelConfig)


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
    install_fast_help()  # every composition copies the store per config group; share it instead
    cs = ConfigStore.instance()
    files = {path.stem for path in (config_dir() / "model").glob("*.yaml")}
    for name in sorted(set(zoo()) | files):
        node = model_node(name)
        for group in ("teacher", "student") if name in files else ("model", "teacher", "student"):
            cs.store(group=group, name=name, node=node)  # the `model` group reads configs/model/ itself
    for path in sorted(recipe_dir().glob("*.yaml")):
        cs.store(group="recipe", name=path.stem, node=complete_recipe(_load(path)), package="_global_")
    _done = True


def compose_config(overrides: list[str], recipe: str | None = None) -> DictConfig:
    """The config ``kdrun [+recipe=<recipe>] <overrides>`` would run, composed outside a Hydra app (tools,
    scripts, tests); Hydra's own keys are not part of it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        return compose("kdrun", overrides=([f"+recipe={recipe}"] if recipe else []) + list(overrides))
