"""The model zoo, registered once: a builder decorated with :func:`register_model` is a zoo model.

timm-style (``@register_model`` in ``timm/models/_registry.py``): the builder function is the single
source of truth. kdrun's config registry (:mod:`kdrun.registry`) turns every entry into a node of the
``model``, ``teacher`` and ``student`` config groups, so ``student=resnet20`` and
``model@models.peer=resnet20`` select it and ``kdrun --help`` lists it::

    @register_model(doc="ResNet-20 for CIFAR (He et al. 2016), 0.278M parameters with 100 classes")
    def resnet20(num_classes: int = 100) -> nn.Module: ...

The node is ``{name, net: {_target_: <module>.<builder>, num_classes: ${data.num_classes}, **config}}``
(``config``: further builder arguments, interpolations allowed). One builder may be registered
several times under different names and arguments (``cnn_small``, ``cnn_tiny``). Models that are not
kdrun's own (torchvision's) keep a YAML file in ``configs/model/`` that declares their taps.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

# modules whose import registers their builders (importing them is what fills the registry)
ZOO_MODULES = ("resnet", "resnetv2", "wrn", "vgg", "mobilenetv2", "shufflenetv1", "shufflenetv2", "simple", "vit", "mae")


@dataclass(frozen=True)
class ZooEntry:
    """One registered model: its config name, builder, one-line description and builder arguments."""

    name: str
    builder: Callable[..., Any]
    doc: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return f"{self.builder.__module__}.{self.builder.__name__}"

    def node(self) -> dict[str, Any]:
        """The config node of the ``model``/``teacher``/``student`` groups."""
        return {"name": self.name, "net": {"_target_": self.target, "num_classes": "${data.num_classes}", **self.config}}


_REGISTRY: dict[str, ZooEntry] = {}


def register_model(fn: F | None = None, *, name: str | None = None, doc: str | None = None,
                   **config: Any) -> Any:
    """Register ``fn`` as zoo model ``name`` (default: the function's name); usable with or without
    arguments. ``doc`` defaults to the first line of the docstring; ``config`` adds builder arguments."""
    def register(builder: F) -> F:
        key = name or builder.__name__
        text = doc or ((builder.__doc__ or "").strip().splitlines() or [key])[0]
        entry = ZooEntry(key, builder, text, dict(config))
        if key in _REGISTRY and _REGISTRY[key] != entry:
            raise ValueError(f"zoo model '{key}' is registered twice ({_REGISTRY[key].target} and {entry.target})")
        _REGISTRY[key] = entry
        return builder

    return register(fn) if fn is not None else register


def zoo() -> dict[str, ZooEntry]:
    """Every registered model by name (imports the zoo modules on first use)."""
    for module in ZOO_MODULES:
        importlib.import_module(f"kdrun.models.{module}")
    return dict(sorted(_REGISTRY.items()))


__all__ = ["ZooEntry", "register_model", "zoo"]
