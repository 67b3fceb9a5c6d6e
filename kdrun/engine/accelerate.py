"""Speed settings of the trainer: mixed precision, channels_last memory format, torch.compile.

- ``trainer.precision``: ``fp32`` | ``bf16`` | ``fp16``. The whole step (teacher included) runs under
  ``torch.autocast`` with that dtype; ``fp16`` adds a gradient scaler (saved in checkpoints).
- ``trainer.channels_last``: models and input batches use the NHWC layout (faster convolutions on
  tensor-core GPUs).
- ``trainer.compile``: every model's forward is wrapped by ``torch.compile`` (``trainer.compile_mode``,
  ``trainer.compile_backend``) for training, or with ``trainer.compile_scope=step`` each stage's whole
  forward (models, adapters, loss terms; :meth:`kdrun.engine.stage.StageRunner.term_outputs`); evaluation runs the eager model, so the test batch size
  never triggers a recompilation. Tap hooks are traced into the compiled graph. Shapes are static
  (``dynamic=False``): the short last batch of an epoch gets its own graph. Each run starts with an
  empty compilation cache (``torch._dynamo.reset()`` in ``Trainer.prepare``), so a second run in one
  process (a sequential sweep, the benchmark) does not inherit the first one's graphs or recompile limit.
  The recompile limit is raised to 8 per compiled model (:func:`compile_budget`: models of one class
  share a cache), and a function that still hits it is named in a warning (:class:`RecompileLimitWatch`)
  instead of silently running eager.
"""
from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdrun.errors import KdrunError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision not in DTYPES:
        raise KdrunError(f"trainer.precision must be one of {', '.join(DTYPES)}, got '{precision}'")
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def to_channels_last(module: nn.Module) -> nn.Module:
    return module.to(memory_format=torch.channels_last)


def model_callables(models: nn.ModuleDict, compile_models: bool, mode: str = "default",
                    backend: str = "inductor") -> dict[str, Callable[[Tensor], Any]]:
    """What the training step calls for each model: the model itself or its compiled forward."""
    if not compile_models:
        return dict(models.items())
    # static shapes: an epoch's short last batch compiles one more static graph, instead of switching the
    # model to dynamic-shape graphs for the rest of the run
    return {name: torch.compile(model, mode=None if mode == "default" else mode, backend=backend, dynamic=False)
            for name, model in models.items()}


RECOMPILE_BUDGET_PER_MODEL = 8  # torch's own recompile_limit, for each compiled model of a run


def compile_budget(models: Mapping[str, nn.Module]) -> int:
    """The recompile limit a run sets (``torch._dynamo.config.recompile_limit``): 8 (torch's default)
    for each compiled model. torch.compile caches graphs per code object, so models of one class (a
    teacher and a student ResNet, DML peers, a born-again run's generations) share one cache of that
    limit; each model's graphs (trained and frozen, full and last batch, every stage's DDP wrapper)
    would exhaust torch's 8 and send the rest of the run to eager mode."""
    return RECOMPILE_BUDGET_PER_MODEL * max(1, len(models))


class RecompileLimitWatch(logging.Handler):
    """Turns torch.compile's warning that a function hit the recompile limit (after which that
    function runs uncompiled, eager, for the rest of the process) into one kdrun warning naming the
    run's models whose ``forward`` it is. Install with :meth:`install`, remove with :meth:`remove`."""

    PATTERN = re.compile(r"hit config\.(?:recompile_limit|cache_size_limit) \((\d+)\).*?function: '([^']+)' \((.+):(\d+)\)",
                         re.S)

    def __init__(self, models: Mapping[str, nn.Module]) -> None:
        super().__init__(logging.WARNING)
        self.by_code: dict[tuple[str, int], list[str]] = {}
        for name, model in models.items():
            code = getattr(type(model).forward, "__code__", None)
            if code is not None:
                self.by_code.setdefault((code.co_filename, code.co_firstlineno), []).append(name)
        self.reported: set[tuple[str, int]] = set()

    def emit(self, record: logging.LogRecord) -> None:
        found = self.PATTERN.search(record.getMessage())
        if found is None:
            return
        limit, function, filename, line = found.group(1), found.group(2), found.group(3), int(found.group(4))
        where = (filename, line)
        if where in self.reported:
            return
        self.reported.add(where)
        names = self.by_code.get(where)
        what = (f"the forward of {', '.join(names)}" if names else f"'{function}' ({filename}:{line})")
        logging.getLogger("kdrun").warning(
            "torch.compile: %s hit the recompile limit (%s graphs) and runs UNCOMPILED (eager) from here on; "
            "the run is correct but slower. TORCH_LOGS=recompiles shows why it recompiled; "
            "torch._dynamo.config.recompile_limit raises the limit.", what, limit)

    def install(self) -> "RecompileLimitWatch":
        logging.getLogger("torch._dynamo").addHandler(self)
        return self

    def remove(self) -> None:
        logging.getLogger("torch._dynamo").removeHandler(self)


def fused_kwargs(optimizer_cls: Any, device: torch.device, enabled: bool, precision: str = "fp32") -> dict[str, bool]:
    """``{'fused': True}`` on CUDA when the optimizer supports it and it is asked for
    (``trainer.fused_optimizer``) or the precision is fp16; else ``{}``.

    Under fp16 the gradient scaler must know whether a step overflowed: a fused optimizer takes the
    scaler's on-device inf flag and skips the update itself, any other reads the flag on the host (one
    synchronisation per optimizer per step), so fp16 uses the fused implementation wherever one exists."""
    import inspect

    if not (enabled or precision == "fp16") or device.type != "cuda":
        return {}
    try:
        params = inspect.signature(optimizer_cls).parameters
    except (TypeError, ValueError):
        return {}
    return {"fused": True} if "fused" in params else {}


def deterministic_failure(ex: BaseException, where: str) -> KdrunError | None:
    """One message for torch's refusal of an op without a deterministic implementation under
    ``trainer.deterministic=true`` (on CUDA: adaptive pooling backward to sizes above 1, weighted
    ``bincount``, ...), naming the op and ``where`` (the stage and its loss terms); None for other errors."""
    text = str(ex)
    marker = "does not have a deterministic implementation"
    if marker not in text:
        return None
    op = text.split(marker)[0].strip().splitlines()[-1] if text.split(marker)[0].strip() else "an operation"
    return KdrunError(f"trainer.deterministic=true: {op} has no deterministic implementation on this device, and {where} "
                      f"uses it. Set trainer.deterministic=false (results then vary slightly from run to run), or "
                      f"change the method's setting that needs it.")
