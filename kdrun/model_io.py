"""How a model is called and how its results become named tensors.

A model reads batch fields through its config's ``inputs`` (``{argument: batch.<field>}``; by default
it is called as ``model(batch.input)``) and publishes what it returns under its name:

- a tensor: ``<model>.logits``;
- a tuple or list: ``<model>.<outputs[i]>``, by default ``logits`` for the first element and
  ``output<i>`` for the others;
- a dict or a Hugging Face ``ModelOutput``: ``<model>.<key>`` for every key whose value is not None
  (a tuple value such as ``hidden_states`` stays one name holding the tuple);

and, beside them, ``<model>.<tap>`` for every tap in use (:class:`kdrun.taps.TapRecorder`).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from kdrun.errors import KdrunError
from kdrun.names import Namespace
from kdrun.taps import TapRecorder

DEFAULT_INPUT = "batch.input"


class ModelIO:
    """The inputs and outputs of one named model (``name``), with its tap recorder."""

    def __init__(self, name: str, recorder: TapRecorder, inputs: Mapping[str, str] | None = None,
                 outputs: list[str] | None = None, key: str | None = None) -> None:
        self.name, self.recorder = name, recorder
        key = key or name
        for arg, value in (inputs or {}).items():
            if not isinstance(value, str) or not value.startswith("batch."):
                raise KdrunError(f"{key}.inputs.{arg}: '{value}' is not a batch field; models read batch.<field> "
                                 f"(e.g. batch.input, batch.input_ids)")
        # None: called positionally with batch.input; else keyword arguments
        self.keywords = {arg: v[len("batch."):] for arg, v in inputs.items()} if inputs else None
        self.reads = [f"batch.{f}" for f in self.keywords.values()] if self.keywords else [DEFAULT_INPUT]
        self.outputs = list(outputs) if outputs else None

    def call(self, fn: Callable[..., Any], batch: Mapping[str, Any]) -> Any:
        """``fn`` (the model, compiled or DDP-wrapped) on this model's fields of ``batch``."""
        if self.keywords is None:
            return fn(batch["input"])
        return fn(**{arg: batch[field] for arg, field in self.keywords.items()})

    def publish(self, out: Any, ns: Namespace) -> None:
        """Add what the model returned, and its taps, to the namespace."""
        name = self.name
        if isinstance(out, Tensor):
            if self.outputs and self.outputs != ["logits"]:
                raise KdrunError(f"{name}.outputs names {self.outputs}, but {name} returns one tensor (published as "
                                 f"{name}.logits); outputs names the elements of a tuple output: drop it")
            ns[f"{name}.logits"] = out
        elif isinstance(out, Mapping):  # dicts and Hugging Face ModelOutput
            ns.update({f"{name}.{k}": v for k, v in out.items() if v is not None})
        elif isinstance(out, (tuple, list)):
            names = self.outputs or ["logits"] + [f"output{i}" for i in range(1, len(out))]
            if len(names) < len(out):
                raise KdrunError(f"{name} returned {len(out)} values but {name}.outputs names {len(names)}: {names}")
            ns.update({f"{name}.{n}": v for n, v in zip(names, out)})
        else:
            raise KdrunError(f"{name} returned a {type(out).__name__}; a model must return a tensor, a tuple, a dict "
                             f"or a ModelOutput")
        for tap, t in self.recorder.pop().items():
            ns[f"{name}.{tap}"] = t

    def run(self, fn: Callable[..., Any], batch: Mapping[str, Any], ns: Namespace) -> None:
        """Call the model on ``batch`` and publish its results into ``ns``."""
        self.publish(self.call(fn, batch), ns)


def output_logits(io: ModelIO, out: Any) -> Tensor | None:
    """The class scores in what the model returned (``logits``), or None when it has none."""
    ns: Namespace = {}
    io.publish(out, ns)
    value = ns.get(f"{io.name}.logits")
    return value if isinstance(value, Tensor) else None
