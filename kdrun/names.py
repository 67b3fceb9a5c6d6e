"""The tensor namespace: every tensor of a step has one flat name, and components read tensors by name.

Names are ``<owner>.<field>``: ``<model>.logits``, ``<model>.<tap>``, ``<model>.<output field>``,
``adapters.<name>``, ``batch.<field>``. A component's ``inputs`` maps its forward arguments to names;
a list of names gives the argument a list of tensors.
"""
from __future__ import annotations

from typing import Any, Union

from torch import Tensor

Inputs = dict[str, Union[str, list[str]]]
Namespace = dict[str, Any]  # name -> Tensor (or a tuple of tensors, e.g. a model's hidden_states)


def names_of(inputs: Inputs) -> list[str]:
    """Every tensor name ``inputs`` reads, in order."""
    out: list[str] = []
    for v in inputs.values():
        out.extend(v if isinstance(v, list) else [v])
    return out


def owner_of(name: str) -> str:
    """``student.stage3`` -> ``student``; ``adapters.hint`` -> ``adapters``; ``batch.input`` -> ``batch``."""
    return name.split(".", 1)[0]


def field_of(name: str) -> str:
    """``student.stage3`` -> ``stage3``; ``adapters.hint`` -> ``hint``."""
    return name.split(".", 1)[1]


def gather(ns: Namespace, inputs: Inputs) -> dict[str, Any]:
    """The keyword arguments ``inputs`` selects from the namespace."""
    return {arg: [ns[n] for n in v] if isinstance(v, list) else ns[v] for arg, v in inputs.items()}


def _shape(value: Any) -> Any:
    return value.shape if isinstance(value, Tensor) else [v.shape for v in value]


def shapes_of(ns: Namespace, inputs: Inputs) -> dict[str, Any]:
    """Like :func:`gather`, with each tensor's ``torch.Size`` instead of the tensor."""
    return {arg: [_shape(ns[n]) for n in v] if isinstance(v, list) else _shape(ns[v]) for arg, v in inputs.items()}


def describe(ns: Namespace, inputs: Inputs) -> str:
    """``"student=student.logits (2, 10), ..."`` for error messages."""
    parts = []
    for arg, v in inputs.items():
        for n in v if isinstance(v, list) else [v]:
            shape = _shape(ns[n]) if n in ns else "missing"
            parts.append(f"{arg}={n} {tuple(shape) if not isinstance(shape, str) else shape}")
    return ", ".join(parts)
