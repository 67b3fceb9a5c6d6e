"""The one place kdrun reaches into Hydra's private code: a better message for a mistyped override,
and a fast ``--help``.

Hydra 1.3 (``hydra-core>=1.3.2,<1.4``, checked with 1.3.8) reports ``student.tempurature=8`` as
"Could not override 'student.tempurature'". kdrun wraps the private static method
``hydra._internal.config_loader_impl.ConfigLoaderImpl._apply_overrides_to_config`` so that the
message names the first unknown part of the key and the closest existing key ("did you mean").

This is an improvement of one message, never a requirement: if a Hydra release renames or removes
the private method, :func:`install_override_suggestions` does nothing and Hydra's own message is
shown. ``tests/test_cli.py`` pins the improved message for the Hydra version installed.

``--help`` lists every config group's options; Hydra 1.3 builds a caching config repository per group,
each a ``deepcopy`` of the repository, and every structured-config source in it holds the whole
``ConfigStore`` (kdrun registers every recipe and zoo model there). :func:`install_fast_help` makes those
sources share the store (safe: ``ConfigStore.load`` already hands out deep copies of its nodes), which
took ``kdrun --help`` from 43 s to a few seconds on 2 cores.
"""
from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig

from kdrun.errors import did_you_mean

log = logging.getLogger("kdrun")

TARGET_HYDRA = "1.3"  # the Hydra minor version whose private override method is wrapped


def _suggestion(overrides: list[Any], cfg: DictConfig) -> str | None:
    """The improved message for the first override whose key does not exist in ``cfg``."""
    for o in overrides:
        if o.is_add() or o.is_force_add() or o.is_delete():
            continue
        key = o.key_or_group
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, DictConfig) and part in node:
                node = node[part]
                continue
            where = ".".join(parts[:i]) or "the top level"
            options = list(node.keys()) if isinstance(node, DictConfig) else []
            return (f"unknown key '{key}': '{part}' is not a key of {where}.{did_you_mean(part, options)}"
                    f" To add a new key on purpose, write +{o.input_line}")
    return None


def install_override_suggestions() -> bool:
    """Wrap Hydra's private override method (idempotent). Returns whether the wrapper is installed;
    False, and Hydra's own messages, when this Hydra version has no such method."""
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.errors import ConfigCompositionException

        original = ConfigLoaderImpl._apply_overrides_to_config
    except (ImportError, AttributeError):
        log.debug("hydra has no ConfigLoaderImpl._apply_overrides_to_config: override suggestions are off")
        return False
    if getattr(original, "_kdrun", False):
        return True

    def apply(overrides: list[Any], cfg: DictConfig) -> None:
        try:
            original(overrides, cfg)
        except ConfigCompositionException as ex:
            if not str(ex).startswith("Could not override"):
                raise
            try:
                message = _suggestion(overrides, cfg)
            except Exception:  # the override objects changed shape: keep Hydra's message
                message = None
            if message is None:
                raise
            raise ConfigCompositionException(message) from None

    apply._kdrun = True  # type: ignore[attr-defined]
    ConfigLoaderImpl._apply_overrides_to_config = staticmethod(apply)  # type: ignore[assignment]
    return True


def install_fast_help() -> bool:
    """Make a deep copy of Hydra's ``ConfigStore`` singleton the singleton itself (idempotent), so that the
    config sources copied for every group's options share it. (Patching the source class does not hold:
    Hydra's plugin scan re-imports it.)"""
    try:
        from hydra.core.config_store import ConfigStore
    except ImportError:
        return False
    if getattr(ConfigStore, "_kdrun_shared", False):
        return True

    def share(self: Any, memo: dict) -> Any:
        return self  # read-only for its copiers: ConfigStore.load hands out deep copies of its nodes

    ConfigStore.__deepcopy__ = share  # type: ignore[attr-defined]
    ConfigStore._kdrun_shared = True  # type: ignore[attr-defined]
    return True
