"""Hugging Face ``transformers`` models as kdrun models: causal LMs, sequence classifiers, encoders.

A model comes from a checkpoint (``path``: a hub name or a local directory, ``from_pretrained``) or
from a config (``config: {model_type: llama, hidden_size: 64, ...}``: random weights, for tests and
for training from scratch). What it returns is a ``ModelOutput``, so the step's namespace gets
``<model>.logits`` (and ``<model>.hidden_states`` / ``<model>.attentions`` when the config asks for them).

Taps (hooked only when something reads them): ``embed`` (the token embeddings), ``hidden.<i>`` (the
output of decoder / encoder layer i, (B, T, width)), ``final_norm`` (the last norm before the head,
for decoders); groups ``layers`` = every ``hidden.<i>`` and ``last_layer``. A layer map between
teacher and student depths is a list of pairs: ``student: [student.hidden.1, student.hidden.3]``,
``teacher: [teacher.hidden.3, teacher.hidden.7]``. Attention probabilities are not a tap (SDPA and flash
attention never form them): set ``attn_implementation: eager`` and ``config_overrides:
{output_attentions: true}`` to receive ``<model>.attentions``.

Options: ``dtype`` (weights, e.g. a bf16 teacher), ``gradient_checkpointing``, ``peft`` (a LoRA student
through ``peft``: ``{r, alpha, dropout, target_modules}``; only the adapter weights train and the run
exports them), ``attn_implementation``, ``revision``, ``trust_remote_code``.

Weights that are neither on disk nor in the Hugging Face cache are downloaded unless ``HF_HUB_OFFLINE=1``;
when that fails, one message says what is missing and how to provide it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdrun.errors import KdrunError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FINAL_NORMS = ("model.norm", "transformer.ln_f", "gpt_neox.final_layer_norm", "model.final_layernorm",
                "model.decoder.final_layer_norm")


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise KdrunError("Hugging Face models need the 'transformers' package: pip install -e \".[text]\"") from None
    transformers.logging.set_verbosity_error()
    return transformers


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _looks_local(path: str) -> bool:
    """A path, not a hub id (``org/name``)."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def missing_message(what: str, path: str, key: str, error: Exception | None = None) -> str:
    """The one message for a model or tokenizer that cannot be loaded: what, where it was looked for, the fixes."""
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(os.environ.get("HF_HOME", "~/.cache/huggingface"), "hub")
    reason = f" ({' '.join(str(error).split())[:120]}...)" if error is not None else ""
    return (f"{key}: cannot load {what} '{path}'{reason}. It is not a local directory with a config.json, and not in "
            f"the Hugging Face cache ({cache}){' (HF_HUB_OFFLINE is set, so nothing was downloaded)' if _offline() else ''}. "
            f"Give a local directory ({key}=/path/to/model, as written by save_pretrained or `hf download {path} "
            f"--local-dir DIR` on a machine with internet), or copy a populated cache and point HF_HOME at it"
            + (f"; or build a random model from a config ({key.rsplit('.', 1)[0]}.config={{model_type: llama, ...}})."
               if what == "the model" else "."))


def _pretrained_kwargs(path: str, key: str, revision: str | None) -> dict[str, Any]:
    """Where ``from_pretrained`` may look: a local directory, else the cache, else (online) the Hub."""
    p = Path(path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file() and not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
            raise KdrunError(f"{key}: '{path}' exists but holds no config.json / tokenizer files; point it at a directory "
                             f"written by save_pretrained")
        return {"pretrained_model_name_or_path": str(p)}
    if _looks_local(path):
        raise KdrunError(f"{key}: no directory '{path}'. {missing_message('the model', path, key)}")
    return {"pretrained_model_name_or_path": path, "revision": revision}


def _cached(repo_id: str, revision: str | None) -> bool:
    """Whether the Hugging Face cache holds a config or tokenizer file of ``repo_id`` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    for name in ("config.json", "tokenizer_config.json", "tokenizer.json"):
        try:
            if isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str):
                return True
        except Exception:  # noqa: BLE001 - an id the hub client refuses (e.g. malformed): not cached
            return False
    return False


def load_pretrained(loader: Any, path: str, key: str, what: str = "the model", revision: str | None = None,
                    **kwargs: Any) -> Any:
    """``loader.from_pretrained(path)`` from disk or cache first, the Hub only when online; a clear error else."""
    base = _pretrained_kwargs(path, key, revision)
    local = Path(path).expanduser().exists()
    if not local and not _cached(path, revision):
        if _offline():  # not on disk, not in the cache, and no network: say so without asking the Hub
            raise KdrunError(missing_message(what, path, key))
    else:
        try:
            return loader.from_pretrained(**base, local_files_only=True, **kwargs)
        except (OSError, ValueError) as ex:
            if _offline() or local:
                raise KdrunError(missing_message(what, path, key, ex)) from None
    try:
        return loader.from_pretrained(**base, **kwargs)
    except (OSError, ValueError) as ex:
        raise KdrunError(missing_message(what, path, key, ex)) from None


def _layer_list(model: nn.Module, count: int | None) -> str | None:
    """The module path of the model's stack of transformer layers (the longest ModuleList, or the one of ``count``)."""
    best: tuple[int, str] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and "lora" not in name:
            if count is not None and len(module) == count:
                return name
            if best is None or len(module) > best[0]:
                best = (len(module), name)
    return None if best is None else best[1]


def layer_stack(model: nn.Module) -> nn.ModuleList | None:
    """The stack of transformer layers of a Hugging Face model (the FSDP units), or None for other models."""
    if not hasattr(model, "config") or not hasattr(model, "get_input_embeddings"):
        return None
    path = _layer_list(model, getattr(model.config, "num_hidden_layers", None))
    return None if path is None else dict(model.named_modules())[path]


def standard_taps(model: nn.Module) -> dict[str, str]:
    """``embed``, ``hidden.<i>`` and ``final_norm`` -> module paths of a transformers model (wrapped by peft or not)."""
    modules = dict(model.named_modules())
    names = {id(m): n for n, m in modules.items()}
    taps: dict[str, str] = {}
    get_embed = getattr(model, "get_input_embeddings", None)
    embed = get_embed() if callable(get_embed) else None
    if embed is not None and id(embed) in names:
        taps["embed"] = names[id(embed)]
    config = getattr(model, "config", None)
    layers = _layer_list(model, getattr(config, "num_hidden_layers", None))
    if layers is not None:
        for i in range(len(modules[layers])):
            taps[f"hidden.{i}"] = f"{layers}.{i}"
    for suffix in _FINAL_NORMS:
        found = [n for n in modules if n == suffix or n.endswith("." + suffix)]
        if found:
            taps["final_norm"] = found[0]
            break
    return taps


def _build(auto_class: str, key: str, path: str | None, config: dict[str, Any] | None, num_classes: int | None,
           dtype: str | None, gradient_checkpointing: bool, peft: dict[str, Any] | None,
           attn_implementation: str | None, revision: str | None, trust_remote_code: bool,
           config_overrides: dict[str, Any] | None, size_arg: str) -> nn.Module:
    transformers = _require_transformers()
    auto = getattr(transformers, auto_class)
    if (path is None) == (config is None):
        raise KdrunError(f"{key}: give exactly one of 'path' (a hub name or a local directory) and 'config' "
                         f"(e.g. {{model_type: llama, hidden_size: 64, num_hidden_layers: 2, ...}})")
    if dtype is not None and dtype not in DTYPES:
        raise KdrunError(f"{key}.dtype: '{dtype}' is not one of {', '.join(DTYPES)}")
    extra: dict[str, Any] = {}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    if path is not None:
        kwargs = dict(extra, trust_remote_code=trust_remote_code, **(config_overrides or {}))
        if dtype is not None:
            kwargs["dtype"] = DTYPES[dtype]
        if auto_class == "AutoModelForSequenceClassification" and num_classes is not None:
            kwargs["num_labels"] = int(num_classes)
        model = load_pretrained(auto, str(path), f"{key}.path", revision=revision, **kwargs)
    else:
        spec = dict(config)
        model_type = spec.pop("model_type", None)
        if model_type is None:
            raise KdrunError(f"{key}.config needs a model_type (llama, qwen2, gpt2, bert, ...)")
        if size_arg not in spec:
            if not num_classes:
                raise KdrunError(f"{key}.config needs {size_arg} (for a language model, the tokenizer's vocabulary: "
                                 f"len(tokenizer)), or set data.num_classes")
            spec[size_arg] = int(num_classes)
        spec.update(config_overrides or {})
        try:
            cfg = transformers.AutoConfig.for_model(str(model_type), **spec)
        except (ValueError, KeyError) as ex:
            raise KdrunError(f"{key}.config: {ex}") from None
        model = auto.from_config(cfg, **extra)
        if dtype is not None:
            model = model.to(DTYPES[dtype])
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # training never reuses keys and values; the output carries no cache
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if peft:
        model = _wrap_lora(model, peft, key)
    model.taps = standard_taps(model)  # type: ignore[assignment]
    return model


def _wrap_lora(model: nn.Module, spec: dict[str, Any], key: str) -> nn.Module:
    try:
        import peft
    except ImportError:
        raise KdrunError(f"{key}.peft needs the 'peft' package: pip install -e \".[text]\"") from None
    spec = dict(spec)
    allowed = {"r", "alpha", "dropout", "target_modules", "bias", "modules_to_save"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise KdrunError(f"{key}.peft: unknown key(s) {unknown}; known: {sorted(allowed)}")
    task = "SEQ_CLS" if "ForSequenceClassification" in type(model).__name__ else "CAUSAL_LM"
    target = spec.get("target_modules", "all-linear")
    lora = peft.LoraConfig(r=int(spec.get("r", 8)), lora_alpha=float(spec.get("alpha", 16)),
                           lora_dropout=float(spec.get("dropout", 0.0)), bias=spec.get("bias", "none"),
                           target_modules=list(target) if isinstance(target, (list, tuple)) else target,
                           modules_to_save=spec.get("modules_to_save"), task_type=task)
    try:
        return peft.get_peft_model(model, lora)
    except ValueError as ex:
        raise KdrunError(f"{key}.peft: {ex}") from None


def causal_lm(path: str | None = None, config: dict[str, Any] | None = None, num_classes: int | None = None,
              dtype: str | None = None, gradient_checkpointing: bool = False, peft: dict[str, Any] | None = None,
              attn_implementation: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
              config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """A ``transformers`` causal LM (``AutoModelForCausalLM``). ``num_classes`` is the vocabulary size of a
    model built from ``config`` (``vocab_size``; a checkpoint keeps its own)."""
    return _build("AutoModelForCausalLM", "net", path, config, num_classes, dtype, gradient_checkpointing, peft,
                  attn_implementation, revision, trust_remote_code, config_overrides, "vocab_size")


def sequence_classifier(path: str | None = None, config: dict[str, Any] | None = None, num_classes: int | None = None,
                        dtype: str | None = None, gradient_checkpointing: bool = False, peft: dict[str, Any] | None = None,
                        attn_implementation: str | None = None, revision: str | None = None,
                        trust_remote_code: bool = False, config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """A ``transformers`` sequence classifier (``AutoModelForSequenceClassification``, e.g. BERT on SST-2);
    ``num_classes`` is its number of labels."""
    return _build("AutoModelForSequenceClassification", "net", path, config, num_classes, dtype, gradient_checkpointing,
                  peft, attn_implementation, revision, trust_remote_code, config_overrides, "num_labels")


def encoder(path: str | None = None, config: dict[str, Any] | None = None, num_classes: int | None = None,
            dtype: str | None = None, gradient_checkpointing: bool = False, attn_implementation: str | None = None,
            revision: str | None = None, trust_remote_code: bool = False,
            config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """A ``transformers`` encoder without a task head (``AutoModel``): ``<model>.last_hidden_state`` and the
    ``hidden.<i>`` taps, for feature distillation. ``num_classes`` is ignored (an encoder has no classes)."""
    return _build("AutoModel", "net", path, config, None, dtype, gradient_checkpointing, None,
                  attn_implementation, revision, trust_remote_code, config_overrides, "vocab_size")


class DotProductScorer(nn.Module):
    """A bi-encoder ranker (BERT_DOT: Hofstatter et al. 2020; Karpukhin et al. 2020): query and passage encoded
    separately by one shared encoder, the score the dot product of their first-token (``[CLS]``) vectors,
    returned as ``logits`` (N, 1). Taps: the encoder's, under ``encoder.``."""

    def __init__(self, encoder_model: nn.Module) -> None:
        super().__init__()
        if getattr(encoder_model, "pooler", None) is not None:
            # the score reads the [CLS] hidden state, never BERT's pooler: dropped, so that no trained parameter
            # goes without a gradient (DDP would stop at the second step) and none is exported unused
            encoder_model.pooler = None
        self.encoder = encoder_model
        self.taps = {k: f"encoder.{v}" for k, v in getattr(encoder_model, "taps", {}).items()}

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]

    def forward(self, query_input_ids: torch.Tensor, query_attention_mask: torch.Tensor, passage_input_ids: torch.Tensor,
                passage_attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        q = self.embed(query_input_ids, query_attention_mask)
        d = self.embed(passage_input_ids, passage_attention_mask)
        return {"logits": (q * d).sum(dim=-1, keepdim=True)}


def dot_encoder(path: str | None = None, config: dict[str, Any] | None = None, num_classes: int | None = None,
                dtype: str | None = None, gradient_checkpointing: bool = False, attn_implementation: str | None = None,
                revision: str | None = None, trust_remote_code: bool = False,
                config_overrides: dict[str, Any] | None = None) -> nn.Module:
    """:class:`DotProductScorer` over a ``transformers`` encoder (:func:`encoder`'s arguments); it reads
    ``batch.query_input_ids``, ``query_attention_mask``, ``passage_input_ids``, ``passage_attention_mask``
    (:func:`kdrun.data.text.ranking_pairs`)."""
    return DotProductScorer(encoder(path, config, num_classes, dtype, gradient_checkpointing, attn_implementation,
                                    revision, trust_remote_code, config_overrides))


def peft_model(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped by ``peft`` (its export is the adapter)."""
    return hasattr(model, "peft_config") and hasattr(model, "save_pretrained")


def is_hf_model(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(model, "config")


__all__ = ["DotProductScorer", "causal_lm", "dot_encoder", "encoder", "is_hf_model", "load_pretrained", "missing_message", "peft_model",
           "sequence_classifier", "standard_taps"]
