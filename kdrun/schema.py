"""The config schema: one dataclass per section, holding every default kdrun has, and the typed
experiment config the builder and the engine read.

Hydra composes a ``DictConfig``; :func:`kdrun.config.validate` checks it against these dataclasses
(naming the bad key) and :func:`experiment_config` turns it into an :class:`ExperimentConfig`. No other
module writes a default: the recipe registry fills recipe nodes from these dataclasses
(:func:`fill_defaults`), and the engine reads typed attributes, never ``cfg.get(key, default)``.

Top-level keys::

    name        run name (recipes set it; the run directory is outputs/<name>/<time>)
    objective   the summary value the run returns to Hydra sweepers (best_top1 by default)
    method      method name shown in reports (KD, CRD, ...); "baseline" for a model trained alone
    seed        global seed                      resume  null | auto | PATH
    data        DataConfig                       trainer TrainerConfig
    teacher     ModelConfig or null              student ModelConfig or null
    models      more named models: {name: ModelConfig}
    adapters    {name: AdapterConfig}: modules fed by named tensors, publishing ``adapters.<name>``
    loss        {name: LossTermConfig}: weighted loss terms reading named tensors
    stages      {name: StageConfig}, run in order
    published   PublishedConfig or null          teachers_dir  where recipes look for teacher weights
    batch_transform  {_target_, ...} or null: mixup/cutmix applied to every training batch (kdrun.data.mix)
    rounds      RoundsConfig or null: self-distillation rounds (student -> next round's teacher)
    probe       ProbeConfig or null: linear-probe evaluation of a model's features after training
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf

from kdrun.errors import KdrunError

# ---------------------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """A named model: ``net`` is instantiated with ``_target_``; weights come from ``checkpoint``.

    ``checkpoint`` is a local path, an http(s) URL (downloaded once into ~/.cache/kdrun), or null (random
    initialisation). ``taps`` adds tap names to the model's own (``name: module.path``).

    ``inputs`` maps the model's forward arguments to batch fields, e.g. ``{input_ids: batch.input_ids,
    attention_mask: batch.attention_mask}``; null (the default) calls ``model(batch.input)``. Each model
    may read other fields (a teacher on the clean image, a student on the augmented one).
    ``outputs`` names the elements of a tuple output (default: ``logits`` for the first, ``output<i>``
    for the others); dict and Hugging Face ``ModelOutput`` results are named by their keys, and a plain
    tensor is ``<model>.logits``. ``dtype`` casts the model's floating-point weights (``float32``,
    ``float64``, ``bfloat16``, ``float16``; null keeps the builder's).
    """

    name: str = MISSING
    net: Any = MISSING
    checkpoint: Optional[str] = None
    strict: bool = True
    taps: dict[str, str] = field(default_factory=dict)
    inputs: Optional[dict[str, str]] = None
    outputs: Optional[list[str]] = None
    dtype: Optional[str] = None
    init_from: Optional[str] = None  # start from another model's weights (after its checkpoint is loaded)
    init_noise: float = 0.0  # eps: w = (w_from + eps * w_fresh) / sqrt(1 + eps^2), w_fresh a new random init
    allow_random: bool = False  # a deliberately random frozen model (Random Teachers): no warning
    # the batch fields this model's evaluation scores against (null: data.eval_target / data.eval_mask); a teacher
    # with its own tokenizer reads teacher_labels / teacher_token_mask (data.source.alignment, docs/text.md)
    eval_target: Optional[str] = None
    eval_mask: Optional[str] = None


@dataclass
class DataConfig:
    """A data set and how it is batched.

    ``source`` is instantiated to :class:`kdrun.data.arrays.ArraySplits` (in-memory images, batch
    augmentation by ``crop_padding``/``hflip``, normalisation by ``mean``/``std``; ``input_shape`` is
    checked against the images), :class:`kdrun.data.datasets.DatasetSplits` (Datasets with their own
    transforms, DataLoader with ``num_workers``) or :class:`kdrun.data.tensors.TensorSplits` (named
    tensors such as token ids and masks, served as ``batch.<field>``); ``root`` is where it reads files.
    ``subset``: train on N examples and evaluate on a proportional number of test examples, each a
    class-stratified choice seeded by ``subset_seed`` (:mod:`kdrun.data.subsets`); a run with a subset is a
    smoke run, not comparable with published numbers.
    """

    name: str = MISSING
    num_classes: int = MISSING
    input_shape: Optional[list[int]] = None  # C, H, W of image data
    root: Optional[str] = None
    subset: Optional[int] = None
    subset_seed: int = 0  # the subset's draw (the same examples for every run seed)
    val_split: Optional[int] = None  # hold out N training examples (seeded) and evaluate on them, not the test set
    val_seed: int = 0
    # hold out N training examples (class-stratified, seeded by meta_seed) that no stage trains on: the meta set
    # of components with an outer step (TGeo-KD's bilevel fusion ratio); array data sets only
    meta_split: Optional[int] = None
    meta_seed: int = 0
    # a directory written by kdrun-cache: the training split's cached teacher top-k (batch.cache_ids, cache_logp,
    # cache_tail; kdrun.data.teacher_cache), checked against the run; token data only
    teacher_cache: Optional[str] = None
    # a kdrun-select directory: train on the training examples it kept (MiniPLM's difference sampling), checked
    # against the run's training split; token data only
    selection: Optional[str] = None
    batch_size: int = 64  # the global micro-batch (over all ranks); x accumulate_grad_batches per optimizer step
    eval_batch_size: int = 256
    drop_last: bool = False
    num_workers: int = 4  # DataLoader workers (Dataset sources only; arrays need none)
    crop_padding: int = 0
    hflip: bool = False
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    eval_mask: Optional[str] = None  # token data: the batch field selecting the positions that evaluation counts
    eval_target: str = "target"  # the batch field evaluation scores against (text data: labels)
    source: Any = MISSING


@dataclass
class TrainerConfig:
    """How the engine runs: device, logging, checkpoints, determinism, gradient accumulation."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    max_epochs: Optional[int] = None  # caps every stage (smoke runs)
    max_steps_per_epoch: Optional[int] = None  # caps the optimizer steps of each epoch (smoke tests)
    accumulate_grad_batches: int = 1  # micro-batches per optimizer step; means stay global means (engine/accumulate.py)
    fsdp: bool = False  # shard every model over the ranks (FSDP2, torchrun; kdrun/engine/fsdp.py) instead of DDP replicas
    gradient_clip_norm: Optional[float] = None  # clip each optimizer group's gradient to this total L2 norm (LLM recipes: 1.0)
    deterministic: bool = False  # torch.use_deterministic_algorithms + cudnn.deterministic
    log_every: int = 50  # optimizer steps between reads of the running losses (the only host syncs)
    eval_every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    eval_every_steps: Optional[int] = None  # also evaluate every N optimizer steps of a stage
    save_every: int = 1  # epochs between `last` checkpoints (the last epoch is always saved)
    save_every_steps: Optional[int] = None  # also write `last` every N optimizer steps (mid-epoch, exact resume)
    save_checkpoints: bool = True  # false: no checkpoints at all (smoke tests, throwaway sweeps)
    progress: str = "auto"  # auto (only on a terminal) | on | off
    tensorboard: bool = True
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a grad scaler)
    channels_last: bool = False  # NHWC models and batches
    compile: bool = False  # torch.compile every model's training forward
    compile_mode: str = "default"  # default | reduce-overhead | max-autotune
    compile_backend: str = "inductor"
    compile_scope: str = "models"  # models: each model's forward | step: a stage's models, adapters and terms as one
    fused_optimizer: bool = False  # pass fused=True to the optimizer on CUDA when it supports it (always under fp16)
    sync_batchnorm: bool = False  # DDP: BatchNorm statistics over the global batch (CUDA only)
    cudnn_benchmark: bool = False  # CUDA: let cuDNN pick the fastest convolution algorithms per shape (not with deterministic)
    tf32: bool = False  # CUDA: TensorFloat-32 matmuls and convolutions in float32 code (false: PyTorch's defaults)
    dist_timeout_s: float = 600.0  # DDP/FSDP: a rank that waits longer in one collective stops with an error naming it
    # loss terms (names under `loss`) evaluated on the evaluation split at every evaluation and logged as
    # monitor/<term>, never trained: e.g. the student's divergence to an oracle beside the proxy to its teacher
    monitor: list[str] = field(default_factory=list)


@dataclass
class CoTrainConfig:
    """More models trained in the same stage, with their own loss terms, optimizer and schedule
    (online distillation). ``train`` lists model names and ``adapters.<name>`` of trainable adapters;
    ``optimizer``/``scheduler`` default to the stage's (with the stage's settings)."""

    train: list[str] = MISSING
    losses: list[str] = MISSING
    optimizer: Any = None
    scheduler: Any = None


@dataclass
class StageConfig:
    """One stage: which models train, with which loss terms, optimizer and schedule, for how long.

    Length: ``epochs`` (passes over the training set) and/or ``max_steps`` (optimizer steps); with
    both, the stage ends at whichever comes first. ``train`` may be empty: then only the trainable
    parameters of the stage's loss terms and adapters learn, and every model runs frozen (eval mode).

    ``co_train`` adds optimizer groups that train other models in the same steps. Each group's
    parameters receive the gradient of that group's own loss terms only (``share_gradients: true``
    gives every parameter the gradient of the whole weighted total instead).
    """

    train: list[str] = MISSING
    losses: list[str] = MISSING
    optimizer: Any = MISSING
    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    eval: Optional[str] = None  # the model whose top-1 is tracked; default: the first of `train`
    scheduler: Any = None
    scheduler_interval: str = "epoch"  # epoch | step
    order: int = 0  # stages run by (order, position in the config): an init stage added by a recipe sets -1
    co_train: dict[str, CoTrainConfig] = field(default_factory=dict)
    share_gradients: bool = False
    # a term's name: every other term's gradient that conflicts with that term's (negative dot product) is
    # projected onto its normal plane before the step (PCGrad's projection; DHKD's gradient alignment, --ga)
    align_gradients: Optional[str] = None
    # {_target_: ...}: this stage's batch transform, instead of the run's `batch_transform` (G2SD: mask noise in
    # the generic stage, mixup/cutmix in the specific one)
    batch_transform: Any = None
    # {model: source}: when the stage starts (not when a resumed run re-enters it), copy into `model` every
    # tensor of `source` with the same name and shape (G2SD: the classifier starts from the MAE's encoder)
    init_weights: dict[str, str] = field(default_factory=dict)


@dataclass
class RoundsConfig:
    """Self-distillation over rounds (born-again networks): every stage runs ``count`` times; after
    round r the ``student``'s weights become the ``teacher``'s and the student starts again from its
    initialisation. ``weights`` overrides loss-term weights per round: ``{term: [w_1, ..., w_count]}``
    (e.g. the ground-truth / teacher balance alpha_r, 1 - alpha_r of Borup & Andersen, "Even your
    Teacher Needs Guidance", NeurIPS 2021)."""

    count: int = MISSING
    teacher: str = "teacher"
    student: str = "student"
    reinit_student: bool = True
    weights: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeConfig:
    """Linear-probe evaluation: a linear classifier trained on the frozen features ``<model>.<tap>``
    of the (unaugmented) training set, tested on the test set, for every model of ``models``, after
    the last stage (of every round). The first model's result is the summary's ``probe_top1``."""

    models: list[str] = field(default_factory=lambda: ["student"])
    tap: str = "feat"
    epochs: int = 30
    lr: float = 0.01
    weight_decay: float = 0.0
    batch_size: int = 512


@dataclass
class GenerationConfig:
    """Generation-based evaluation after the last stage (:mod:`kdrun.engine.generation`): each model of
    ``models`` completes the test prompts and is scored by ROUGE-L against the reference responses, once
    per seed when sampling (defaults: MiniLLM's evaluation, T = 1, top-k 0, top-p 1, 5 seeds)."""

    models: list[str] = field(default_factory=lambda: ["student"])
    max_new_tokens: int = 128
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])
    max_examples: Optional[int] = 500
    batch_size: int = 16


@dataclass
class PublishedEntry:
    teacher: Optional[str] = None
    student: str = MISSING
    top1: float = MISSING
    note: str = ""


@dataclass
class PublishedConfig:
    """The published numbers a recipe reproduces, per (teacher, student) pair."""

    source: str = MISSING
    metric: str = MISSING  # best | last
    table: list[PublishedEntry] = field(default_factory=list)


# ------------------------------------------------------------------ components (open key sets)


@dataclass
class LossTermConfig:
    """A weighted loss term (``loss.<name>``): kdrun's keys below; every other key of the node is an
    argument of its ``_target_`` class (``node`` holds ``_target_`` and those arguments)."""

    node: dict[str, Any]
    inputs: dict[str, Any]  # forward argument -> tensor name (or list of names)
    weight: float = 1.0
    warmup_epochs: int = 0  # the weight ramps linearly over this many epochs: w * min(1, (e + warmup_offset) / n)
    warmup_offset: int = 1  # 1: the first epoch (e = 0) gets 1/n (mdistiller); 0: it gets 0 (the ND authors' loop)


@dataclass
class AdapterConfig:
    """A module fed by named tensors that publishes ``adapters.<name>`` (``adapters.<name>``): kdrun's keys
    below; every other key is an argument of its ``_target_``."""

    node: dict[str, Any]
    inputs: dict[str, Any]
    target: Optional[str] = None  # the tensor whose size ``out_*: auto`` arguments match
    trainable: bool = True


def kdrun_keys(schema: type) -> set[str]:
    """The keys of a component node that kdrun reads itself (the rest go to the constructor)."""
    return {"_target_"} | {f.name for f in dataclasses.fields(schema) if f.name != "node"}


LOSS_KEYS = kdrun_keys(LossTermConfig)
ADAPTER_KEYS = kdrun_keys(AdapterConfig)
OBJECTIVES = ("best_top1", "last_top1", "best_top5", "last_top5", "probe_top1")
TOP_LEVEL_KEYS = {
    "objective", "name", "method", "seed", "resume", "data", "trainer", "teacher", "student", "models",
    "adapters", "loss", "stages", "published", "teachers_dir", "hydra", "batch_transform", "rounds", "probe", "generation",
}
RESERVED_MODEL_NAMES = {"batch", "adapters"}
DTYPES = ("float32", "float64", "bfloat16", "float16")


# -------------------------------------------------------------------------------- typed experiment


@dataclass
class ExperimentConfig:
    """The validated experiment, typed: what the builder and the engine read.

    ``models`` holds ``teacher`` and ``student`` (when not null) and every ``models.<name>``, in that
    order; ``stages`` keeps the config's order (:func:`kdrun.plan.ordered_stages` sorts by ``order``).
    ``raw`` is the resolved config as composed, written to the run directory as ``config.yaml``.
    """

    name: str
    method: Optional[str]
    seed: int
    objective: str
    resume: Optional[str]
    teachers_dir: Optional[str]
    data: DataConfig
    trainer: TrainerConfig
    models: dict[str, ModelConfig]
    adapters: dict[str, AdapterConfig]
    loss: dict[str, LossTermConfig]
    stages: dict[str, StageConfig]
    published: Optional[PublishedConfig]
    batch_transform: Optional[dict[str, Any]]
    rounds: Optional[RoundsConfig]
    probe: Optional[ProbeConfig]
    raw: DictConfig
    generation: Optional[GenerationConfig] = None

    @property
    def teacher_name(self) -> Optional[str]:
        """The ``teacher`` model's zoo name, when there is one."""
        return self.models["teacher"].name if "teacher" in self.models else None

    @property
    def student_name(self) -> Optional[str]:
        return self.models["student"].name if "student" in self.models else None


def typed(node: Any, schema: type) -> Any:
    """``node`` as an instance of the dataclass ``schema``, every default filled in."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _component(node: DictConfig, schema: type) -> Any:
    raw = _container(node)
    keys = kdrun_keys(schema) - {"_target_"}
    fields = {k: raw[k] for k in keys if k in raw}
    return schema(node={k: v for k, v in raw.items() if k not in keys}, **fields)


def model_entries(cfg: DictConfig) -> dict[str, DictConfig]:
    """The model nodes of a composed config by name: ``teacher``, ``student`` (when not null) and
    ``models.*``; a ``models.<name>`` that takes a reserved or taken name is a config error."""
    out: dict[str, DictConfig] = {}
    for key in ("teacher", "student"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    for name, node in (cfg.get("models") or {}).items():
        if name in out or name in RESERVED_MODEL_NAMES:
            raise KdrunError(f"models.{name}: the name '{name}' is taken; choose another model name")
        if node is not None:
            out[str(name)] = node
    return out


def experiment_config(cfg: DictConfig) -> ExperimentConfig:
    """The typed form of a validated config (see :func:`kdrun.config.validate`), interpolations resolved."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))

    def optional(key: str, schema: type) -> Any:
        return typed(cfg[key], schema) if cfg.get(key) is not None else None

    transform = _container(cfg.get("batch_transform")) or None
    return ExperimentConfig(
        name=str(cfg.get("name")), method=cfg.get("method"), seed=int(cfg.get("seed", 0)),
        objective=str(cfg.get("objective") or "best_top1"), resume=cfg.get("resume"),
        teachers_dir=cfg.get("teachers_dir"),
        data=typed(cfg.data, DataConfig), trainer=typed(cfg.trainer, TrainerConfig),
        models={name: typed(node, ModelConfig) for name, node in model_entries(cfg).items()},
        adapters={str(k): _component(v, AdapterConfig) for k, v in (cfg.get("adapters") or {}).items()},
        loss={str(k): _component(v, LossTermConfig) for k, v in (cfg.get("loss") or {}).items()},
        stages={str(k): typed(v, StageConfig) for k, v in cfg.stages.items()},
        published=optional("published", PublishedConfig), batch_transform=transform,
        rounds=optional("rounds", RoundsConfig), probe=optional("probe", ProbeConfig), raw=cfg,
        generation=optional("generation", GenerationConfig),
    )


# ------------------------------------------------------------------------- defaults in recipe nodes

# A node is *defining* when it has this key; only defining nodes are filled. A recipe's partial
# override of an inherited node (``stages.main: {losses: [ce, ft]}``) must not be filled: its
# defaults would overwrite the inherited values when Hydra merges the recipes.
_DEFINING = {StageConfig: "train", CoTrainConfig: "train", LossTermConfig: "_target_", AdapterConfig: "_target_",
             ModelConfig: "net"}
# keys a recipe's defaults list fills (``/optim@stages.main.optimizer: sgd``): a filled null would
# overwrite them, because a recipe's own node is merged after its defaults list. (A co-trained group's
# optimizer and scheduler are filled with null, "the stage's", so that they can be overridden.)
_NEVER_FILLED = {StageConfig: {"optimizer", "scheduler"}}


def fill_defaults(node: DictConfig, schema: type) -> None:
    """Add the schema's default for every key a *defining* ``node`` lacks (in place), so that each key
    can be overridden on the command line without a ``+``."""
    if not isinstance(node, DictConfig) or _DEFINING[schema] not in node:
        return
    for f in dataclasses.fields(schema):
        if f.name in node or f.name in _NEVER_FILLED.get(schema, ()) or f.name == "node":
            continue
        if f.default is not dataclasses.MISSING and f.default is not MISSING:
            node[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            node[f.name] = f.default_factory()  # type: ignore[misc]
