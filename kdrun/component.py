"""What loss terms and adapters receive from kdrun: one build context, and lifecycle hooks.

:class:`Component` is the base of :class:`kdrun.losses.base.LossTerm` (and of adapters that need it).
Its methods are documented no-ops; the builder and the engine call them on every component that
derives from it, unconditionally, in this order:

- ``setup(ctx)`` once at build time, after the shape trace and before the optimizer exists or a
  checkpoint is loaded: create the sub-modules and buffers whose sizes depend on the inputs. ``ctx``
  is a :class:`BuildContext`: the input shapes, the training set's size (and labels when the data set
  knows them), the device, and read-only access to the named models and their sub-modules (a margin
  from the teacher's BatchNorm, a classifier to reuse).
- ``on_stage_start(stage)`` when a stage starts (also on resume), with a :class:`StageInfo`.
- ``on_epoch_start(epoch, total_epochs)`` before every epoch (0-based).
- ``on_step(step, total_steps)`` before every optimizer step of a stage (0-based, stage-local).
- ``class_mean_inputs()`` (loss terms) when a stage that uses the term starts: the forward arguments whose
  per-class means over the training set the component needs (ND's teacher class centres, TGeo-KD's
  class-average teacher predictions). For each, the engine runs the tensor's (frozen) model in eval mode
  over the unaugmented training set, averages the tensor per label (sums all-reduced under data
  parallelism), calls ``set_class_means({argument: (C, ...) tensor})`` and writes them to
  ``<run dir>/class_means/<term>.pt``. The component keeps them as buffers (so a checkpoint holds them)
  and returns no argument once it has them.
- ``outer_step(step)`` before every optimizer step, for a component whose ``wants_outer_step`` is True (the
  run needs ``data.meta_split``): an :class:`OuterStep` holds the step's first training micro-batch, a batch
  of the held-out meta set, and a functional forward of the run's models with parameters of the component's
  choosing, for a bilevel update of the component's own parameters (TGeo-KD's one-step look-ahead). Those
  parameters are not given to the stage's optimizer: ``stage_parameters()`` (default: all of the
  component's parameters) says what the optimizer gets.
- ``transform_batch(batch)`` on every training micro-batch, after the stage's batch transform and before any
  model, for a component whose ``transforms_batch`` is True: the batch the models train on (HARD's learned
  augmentation; evaluation batches are never changed).
- ``on_evaluation(metrics)`` after every evaluation of a stage, with the row it logs (``test_loss``, ``ppl``,
  ``top1``, ...; the same on every rank): feedback from held-out data (DistiLLM's adaptive replay threshold).
- ``on_batch(rank_sizes, rank)`` before every training micro-batch: how many samples of the global
  micro-batch each rank holds (in rank order; every rank holds a contiguous share), and this process's
  rank. Known on the host, so a component that must see the whole global batch (a memory bank) can
  gather it without a host read.

A plain ``nn.Module`` used as a loss term or adapter gets none of these calls.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdrun.errors import did_you_mean


@dataclass(frozen=True)
class BuildContext:
    """What a component may know when it is built.

    Attributes:
        shapes: the component's inputs by forward argument: a ``torch.Size`` per tensor (batch
            dimension included), a list of them for a list input.
        num_train: the number of training samples (memory banks, sample-indexed state).
        train_labels: int64 (num_train,) class labels of the training set, when the data set has them.
        device: where the run trains.
        tensor_shapes: the shape of every named tensor of the build-time trace, by name.
        models: the run's models by name (see :meth:`model`).
        inputs: the tensor names of the component's inputs by forward argument (a list for a list input),
            e.g. ``{"teacher": ["teacher.stage1_pre", ...]}``.
        seed: the run's ``seed``; a component drawing random numbers that must agree on every rank
            (CRD's negatives of the global batch) seeds its own generator from it, because the global
            generators are seeded per rank under data parallelism.
        teacher_tokenizer: text data whose teacher tokenises the text itself (``data.source.alignment`` spans or
            positions): the teacher's tokenizer, and ``alignment``, how its tokens are aligned with the student's.
    """

    shapes: Mapping[str, Any]
    num_train: int
    train_labels: Tensor | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tensor_shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    models: Mapping[str, nn.Module] = field(default_factory=dict)
    seed: int = 0
    inputs: Mapping[str, Any] = field(default_factory=dict)
    teacher_tokenizer: Any = None
    alignment: str = "identical"

    def model(self, name: str) -> nn.Module:
        """The named model (read it, never change it: it is the model the run trains or freezes)."""
        if name not in self.models:
            raise ValueError(f"no model '{name}'.{did_you_mean(name, self.models)} Models: {', '.join(self.models)}")
        return self.models[name]

    def module(self, model: str, path: str) -> nn.Module:
        """The sub-module at ``path`` (``layer3.0.bn2``) of the named model."""
        modules = dict(self.model(model).named_modules())
        if path not in modules:
            raise ValueError(f"{model} has no module '{path}'.{did_you_mean(path, [m for m in modules if m])}")
        return modules[path]


@dataclass(frozen=True)
class StageInfo:
    """The stage that is starting: its name, position, round, and which models train or are frozen."""

    name: str
    index: int
    round: int
    trained_models: tuple[str, ...]
    frozen_models: tuple[str, ...]
    epochs: int
    max_steps: int | None


@dataclass
class OuterStep:
    """What :meth:`Component.outer_step` receives before an optimizer step.

    Attributes:
        batch: the step's first training micro-batch, as the models see it (after the batch transform).
        held_out: a batch of the meta set (``data.meta_split``), augmented as training batches, in a seeded order
            (empty for components whose ``outer_step_needs_held_out`` is False).
        forward: ``forward(batch, models, params=None)`` runs the named models on ``batch`` and returns
            their named tensors (``<model>.logits``, taps) with the batch's fields (``batch.<field>``).
            ``params`` maps a model to replacement parameters ``{name: tensor}`` (the others keep theirs):
            that model runs functionally (``torch.func.functional_call``) with its own mode and copies of
            its buffers (running statistics are left as they were), differentiably; every other model runs
            without autograd.
        lr: ``lr(model)``: the current learning rate of the optimizer group that trains ``model``.
        reduce_mean: averages a list of tensors over the data-parallel ranks in place (a no-op in one
            process), for gradients of parameters that must stay identical on every rank.
        params: ``params(model)``: the model's trained parameters ``{name: parameter}``.
        step: the stage's optimizer step (0-based).
    """

    batch: Mapping[str, Tensor]
    held_out: Mapping[str, Tensor]
    forward: Callable[..., dict[str, Any]]
    lr: Callable[[str], float]
    reduce_mean: Callable[[Sequence[Tensor]], None]
    params: Callable[[str], dict[str, Any]]
    step: int = 0


class Component(nn.Module):
    """Base class of kdrun components: the hooks the builder and the engine call (all no-ops here)."""

    wants_outer_step: bool = False  # True: the engine calls outer_step before every optimizer step
    transforms_batch: bool = False  # True: the engine calls transform_batch on every training micro-batch
    outer_step_needs_held_out: bool = True  # False: the outer step works on the training batch alone (no meta set)

    def stage_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the stage's optimizer trains (default all; an outer step trains the rest)."""
        return self.parameters()

    def outer_step(self, step: OuterStep) -> None:
        """Update the component's own parameters from a held-out batch before the optimizer step (see
        :class:`OuterStep`); called when ``wants_outer_step`` is True."""

    def transform_batch(self, batch: Mapping[str, Tensor]) -> Mapping[str, Tensor]:
        """The training micro-batch the models see (called when ``transforms_batch`` is True; default unchanged)."""
        return batch

    def setup(self, ctx: BuildContext) -> None:
        """Create input-size-dependent sub-modules and buffers (called once at build time)."""

    def on_stage_start(self, stage: StageInfo) -> None:
        """Called when a stage starts (and when a resumed run re-enters it)."""

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        """Called before every epoch of a stage (0-based ``epoch``)."""

    def on_step(self, step: int, total_steps: int) -> None:
        """Called before every optimizer step of a stage (0-based, counted from the stage's start)."""

    def on_evaluation(self, metrics: Mapping[str, Any]) -> None:
        """Called after every evaluation of a stage with its logged row (identical on every rank)."""

    def class_mean_inputs(self) -> tuple[str, ...]:
        """Forward arguments whose per-class training-set means the component still needs (default none)."""
        return ()

    def class_mean_of(self, argument: str, value: Tensor) -> Tensor:
        """What is averaged per class for ``argument`` (default the tensor itself, e.g. a softmax of logits)."""
        return value

    def set_class_means(self, means: Mapping[str, Tensor]) -> None:
        """Receive the per-class means asked for by :meth:`class_mean_inputs` (float32, on the run's device)."""

    def on_batch(self, rank_sizes: tuple[int, ...], rank: int) -> None:
        """Called before every training micro-batch: the samples of the global micro-batch on every rank.
        Recorded for :meth:`spread_layout` (an override should call this one)."""
        self._batch_layout = (tuple(int(n) for n in rank_sizes), int(rank))

    def spread_layout(self) -> tuple[tuple[int, ...], int] | None:
        """``(rank_sizes, rank)`` when the current training micro-batch spans several ranks of an initialised
        process group (state must then be kept global), else None."""
        layout = getattr(self, "_batch_layout", None)
        if (not self.training or layout is None or len(layout[0]) < 2 or not torch.distributed.is_available()
                or not torch.distributed.is_initialized()):
            return None
        return layout


class DeviceGenerator:
    """A component's own random generator: a ``torch.Generator`` made on the device of its first draw and
    seeded with ``seed``, so the same on every rank (unlike the global generators, seeded per rank under
    data parallelism). :meth:`state_dict` / :meth:`load_state_dict` go into the component's extra state, so a
    resumed run continues the sequence; a state of another device type (CPU vs CUDA generators) continues
    with a sequence seeded from ``(seed, draws)``."""

    def __init__(self, seed: int = 0) -> None:
        self.seed, self.draws = int(seed), 0
        self.generator: torch.Generator | None = None
        self._saved: tuple[str, Tensor] | None = None  # a loaded state, applied at the next draw

    def draw(self, device: torch.device | str) -> torch.Generator:
        """The generator on ``device``, for one draw (counted)."""
        device = torch.device(device)
        gen = self.generator
        if gen is None or gen.device.type != device.type or (device.index is not None and gen.device.index != device.index):
            gen = torch.Generator(device=device)
            saved, self._saved = self._saved, None
            if saved is not None and saved[0] == device.type:
                gen.set_state(saved[1])
            else:  # a fresh generator, or one continued on another device type
                gen.manual_seed(self.seed if self.draws == 0 else self.seed * 1_000_003 + self.draws)
            self.generator = gen
        self.draws += 1
        return gen

    def state_dict(self) -> dict[str, Any]:
        if self.generator is not None:
            device, state = self.generator.device.type, self.generator.get_state()
        else:
            device, state = self._saved if self._saved is not None else (None, None)
        return {"seed": self.seed, "draws": self.draws, "device": device, "generator": state}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.seed, self.draws = int(state["seed"]), int(state.get("draws", 0))
        self.generator = None
        gen = state.get("generator")
        # TRG checkpoints written before its generator moved to the device hold a CPU generator's state
        self._saved = (state.get("device") or "cpu", gen.cpu()) if gen is not None else None


def gather_rows(x: Tensor, rank_sizes: tuple[int, ...]) -> Tensor:
    """Every rank's rows of ``x`` (``rank_sizes[r]`` rows on rank r), concatenated in rank order: the global
    micro-batch. The sizes are host values, so ranks with fewer rows pad and nothing is read from the device."""
    cap = max(rank_sizes)
    padded = torch.cat([x, x.new_zeros((cap - x.shape[0], *x.shape[1:]))]) if x.shape[0] < cap else x
    parts = [torch.empty_like(padded) for _ in rank_sizes]
    torch.distributed.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, rank_sizes)])


def components(modules: Mapping[str, nn.Module]) -> list[Component]:
    """The modules that take kdrun's hooks (subclasses of :class:`Component`), in order."""
    return [m for m in modules.values() if isinstance(m, Component)]
