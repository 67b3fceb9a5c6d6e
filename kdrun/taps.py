"""Taps: named tensors captured by forward hooks at module paths, so models need no editing.

A model publishes ``<model>.logits`` (its output) and ``<model>.<tap>`` for every tap in use, where
a tap names a module path whose forward output is the tensor (``stage2: layer2``). Zoo models
declare their standard taps in a ``taps`` attribute; configs add more with ``<model>.taps``.
Only the taps something reads are hooked, so unused taps cost nothing.
"""
from __future__ import annotations

from torch import Tensor, nn

from kdrun.errors import KdrunError, did_you_mean


def declared_taps(model: nn.Module, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The model's own ``taps`` attribute merged with ``extra`` (``extra`` wins)."""
    taps = dict(getattr(model, "taps", {}) or {})
    taps.update(extra or {})
    return taps


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
                raise KdrunError(
                    f"'{name}.{tap}' is not a tap of {name} ({type(model).__name__}).{did_you_mean(tap, list(taps) + ['logits'])} "
                    f"Its taps: {', '.join(sorted(taps)) or 'none'}, logits; add one with {name}.taps.{tap}=<module.path>."
                )
            path = taps[tap]
            if path not in modules:
                raise KdrunError(
                    f"{name}.taps.{tap}: {type(model).__name__} has no module '{path}'.{did_you_mean(path, [m for m in modules if m])}"
                )
            self._handles.append(modules[path].register_forward_hook(self._hook(tap)))

    def _hook(self, tap: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if self.active:
                self.outputs[tap] = output
        return hook

    def pop(self) -> dict[str, Tensor]:
        """Return and forget the captured tensors of the last forward."""
        out, self.outputs = self.outputs, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
