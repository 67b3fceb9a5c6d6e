"""Taps: named tensors captured by forward hooks at module paths, so models need no editing.

A model publishes ``<model>.logits`` (its output) and ``<model>.<tap>`` for every tap in use, where
a tap names a module path whose forward output is the tensor (``stage2: layer2``). Zoo models
declare their standard taps in a ``taps`` attribute; configs add more with ``<model>.taps``.
Only the taps something reads are hooked, so unused taps cost nothing.

Tap groups name several taps at once, derived from the standard tap names so that one recipe fits
every architecture: ``stages`` = [stage1, ..., stageK], ``stages_pre`` = [stage1_pre, ...],
``features`` = [stem, stage1, ..., stageK], and the aliases ``last_stage`` = stageK and
``last_stage_pre`` = stageK_pre; for transformers (taps ``hidden.<i>``), ``layers`` = [hidden.0, ...] and
``last_layer``. ``inputs: {student: student.stages}`` gives the loss a list. A module that returns a
tuple (a transformer layer returning its attention too) is tapped at its first element.
"""
from __future__ import annotations

import re
from typing import Any

from torch import Tensor, nn

from kdrun.errors import KdrunError, did_you_mean


def declared_taps(model: nn.Module, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The model's own ``taps`` attribute merged with ``extra`` (``extra`` wins)."""
    taps = dict(getattr(model, "taps", {}) or {})
    taps.update(extra or {})
    return taps


def tap_groups(taps: dict[str, str]) -> dict[str, list[str] | str]:
    """Groups and aliases derived from standard tap names (see the module docstring)."""
    def numbered(pattern: str) -> list[str]:
        found = [(int(m.group(1)), t) for t in taps if (m := re.fullmatch(pattern, t))]
        return [t for _, t in sorted(found)]

    groups: dict[str, list[str] | str] = {}
    stages, pre = numbered(r"stage(\d+)"), numbered(r"stage(\d+)_pre")
    if stages:
        groups["stages"] = stages
        groups["last_stage"] = stages[-1]
        groups["features"] = (["stem"] if "stem" in taps else []) + stages
    if pre:
        groups["stages_pre"] = pre
        groups["last_stage_pre"] = pre[-1]
    layers = numbered(r"hidden\.(\d+)")
    if layers:  # transformer layers (kdrun.models.hf)
        groups["layers"] = layers
        groups["last_layer"] = layers[-1]
    return {k: v for k, v in groups.items() if k not in taps}


def expand_groups(inputs: dict[str, Any], groups: dict[str, dict[str, list[str] | str]]) -> dict[str, Any]:
    """Replace ``<model>.<group>`` names in ``inputs`` by their taps (a list, or one name for an alias)."""
    def expand(name: str) -> list[str] | str:
        owner, _, tap = name.partition(".")
        group = groups.get(owner, {}).get(tap)
        if group is None:
            return name
        return [f"{owner}.{t}" for t in group] if isinstance(group, list) else f"{owner}.{group}"

    out: dict[str, Any] = {}
    for arg, value in inputs.items():
        if isinstance(value, list):
            flat: list[str] = []
            for v in value:
                e = expand(v)
                flat.extend(e if isinstance(e, list) else [e])
            out[arg] = flat
        else:
            out[arg] = expand(value)
    return out


class TapRecorder:
    """Registers forward hooks for the chosen taps of one model and keeps their latest outputs.

    Args:
        model: the model. name: its name in configs (for messages).
        taps: tap name -> module path. wanted: the tap names to hook.
    """

    def __init__(self, model: nn.Module, name: str, taps: dict[str, str], wanted: set[str]) -> None:
        self.name = name
        self.outputs: dict[str, Tensor] = {}
        self.active = True
        self._handles = []
        modules = dict(model.named_modules())
        for tap in sorted(wanted):
            if tap not in taps:
                options = list(taps) + list(tap_groups(taps)) + ["logits"]
                raise KdrunError(
                    f"'{name}.{tap}' is not a tap of {name} ({type(model).__name__}).{did_you_mean(tap, options)} "
                    f"Its taps: {', '.join(sorted(taps)) or 'none'}, logits; groups: {', '.join(tap_groups(taps)) or 'none'}; "
                    f"add a tap with {name}.taps.{tap}=<module.path>."
                )
            path = taps[tap]
            if path not in modules:
                raise KdrunError(
                    f"{name}.taps.{tap}: {type(model).__name__} has no module '{path}'.{did_you_mean(path, [m for m in modules if m])}"
                )
            self._handles.append(modules[path].register_forward_hook(self._hook(tap)))

    def _hook(self, tap: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self.active:  # a module returning a tuple (a transformer layer with its attention) publishes its first element
                self.outputs[tap] = output[0] if isinstance(output, tuple) and output and isinstance(output[0], Tensor) else output
        return hook

    def pop(self) -> dict[str, Tensor]:
        """Return and forget the captured tensors of the last forward."""
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
