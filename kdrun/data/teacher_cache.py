"""Teacher outputs cached to disk: top-k next-token log-probabilities per scored token, memory-mapped.

A cache is a directory written by ``kdrun-cache`` (:mod:`kdrun.cache`) for one model over the training
split of a token data set, in the split's order:

- ``topk_ids.npy`` int32 (N_tok, K): the model's K most likely next tokens at every scored position;
- ``topk_logp.npy`` float16 or float32 (N_tok, K): their log-probabilities at temperature 1;
- ``tail_logp.npy`` same dtype (N_tok,): ``log(1 - sum_k p_k)``, the mass of every other token;
- ``positions.npy`` int16 or int32 (N_tok,): each token's position in its sample;
- ``offsets.npy`` int64 (N + 1,): sample i's tokens are rows ``offsets[i]:offsets[i + 1]``;
- ``manifest.json``: what made it (:func:`manifest_of`).

Only positions where the mask field (``token_mask``) is non-zero are stored. Bytes per token:
``K (4 + b) + b + 2`` with b = 2 for float16 (196 at K = 32; measured so), ``K (4 + b) + b + 4`` above 32,767 positions.

``data.teacher_cache: DIR`` attaches a cache to a run (:func:`open_cache` in the builder): it is refused,
naming the field, unless the run's training split has the same fingerprint (the sha256 of its tensors),
the same tokenizer, the same mask field and token counts, and (when the run names the cached model) the
same checkpoint. Training batches then carry ``batch.cache_ids`` (B, L, K) int64, ``batch.cache_logp``
(B, L, K) and ``batch.cache_tail`` (B, L) float32, read from the memory maps by sample index on the host
(no device synchronisation) and zero where nothing is stored; the teacher is not run.

A cache written with ``--reference`` (ADPA: an aligned teacher and its reference) also holds
``ref_logp.npy`` (N_tok, K), the reference's log-probabilities at the first model's top-k tokens, and
``ref_tail_logp.npy`` (N_tok,), the log of its mass on every other token; training batches then carry
``batch.cache_ref_logp`` (B, L, K) and ``batch.cache_ref_tail`` (B, L) too, and a run that names the reference
model checks its checkpoint like the first model's.

A **score cache** (``kdrun-cache --scores``; manifest ``kind: scores``) holds one row of the model's outputs per
sample instead: ``scores.npy`` float32 (N, C), e.g. a cross-encoder's relevance score of every (query, passage)
row for Margin-MSE. Training batches then carry ``batch.cache_scores`` (B, C); the same checks apply, except the
token counts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from kdrun.errors import KdrunError

FORMAT = 1
FIELDS = ("cache_ids", "cache_logp", "cache_tail")


def fingerprint(fields: Mapping[str, Tensor]) -> str:
    """sha256 of the split's tensors (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name in sorted(fields):
        t = fields[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def tokenizer_digest(tok: Any) -> str | None:
    """sha256 of the tokenizer's serialised form (``tokenizers`` JSON, or a Hugging Face tokenizer's
    backend), or None for data without a tokenizer."""
    if tok is None:
        return None
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None) or tok
    to_str = getattr(backend, "to_str", None)
    text = to_str() if callable(to_str) else repr(sorted(tok.get_vocab().items())) if hasattr(tok, "get_vocab") else None
    return hashlib.sha256(text.encode()).hexdigest() if text is not None else None


def file_digest(path: str | None) -> str | None:
    """sha256 of a checkpoint file, or None when there is none (random weights) or it is not a local file."""
    if not path or not Path(path).is_file():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest_of(cfg: Any, data: Any, model: str, k: int, dtype: str, mask_field: str, counts: np.ndarray) -> dict[str, Any]:
    """What a cache records about the run that wrote it (checked again by every run that reads it)."""
    from kdrun import __version__

    mcfg = cfg.models[model]
    return {"format": FORMAT, "kdrun": __version__, "model": model, "model_name": mcfg.name,
            "checkpoint": mcfg.checkpoint, "checkpoint_sha256": file_digest(mcfg.checkpoint),
            "tokenizer_sha256": tokenizer_digest(getattr(data, "tokenizer", None)),
            "chat_template": (cfg.data.source or {}).get("chat_template"),
            "max_length": (cfg.data.source or {}).get("seq_len", (cfg.data.source or {}).get("max_length")),
            "mask_field": mask_field, "k": int(k), "dtype": dtype, "temperature": 1.0,
            "dataset": cfg.data.name, "dataset_sha256": fingerprint(data.train), "samples": int(len(counts)),
            "tokens": int(counts.sum())}


class TeacherCache:
    """A cache directory opened for reading (memory-mapped; see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise KdrunError(f"data.teacher_cache: {self.path} holds no manifest.json; write a cache with "
                             f"kdrun-cache --model teacher --out {self.path} +recipe=...")
        self.manifest: dict[str, Any] = json.loads(manifest.read_text())
        if self.manifest.get("format") != FORMAT:
            raise KdrunError(f"data.teacher_cache: {self.path} is cache format {self.manifest.get('format')}, this kdrun "
                             f"reads format {FORMAT}; write it again with kdrun-cache")
        self.kind = str(self.manifest.get("kind", "top_k"))
        self.mask_field = self.manifest.get("mask_field")
        if self.kind == "scores":
            file = self.path / "scores.npy"
            if not file.is_file():
                raise KdrunError(f"data.teacher_cache: {file} is missing (an interrupted write?); write the cache again")
            self.scores = np.load(file, mmap_mode="r")
            return
        arrays = {}
        for name in ("topk_ids", "topk_logp", "tail_logp", "positions", "offsets"):
            file = self.path / f"{name}.npy"
            if not file.is_file():
                raise KdrunError(f"data.teacher_cache: {file} is missing (an interrupted write?); write the cache again")
            arrays[name] = np.load(file, mmap_mode="r")
        self.ids, self.logp, self.tail = arrays["topk_ids"], arrays["topk_logp"], arrays["tail_logp"]
        self.positions, self.offsets = arrays["positions"], np.asarray(arrays["offsets"])
        self.k = int(self.ids.shape[1])
        self.mask_field = str(self.manifest["mask_field"])
        self.reference = self.manifest.get("reference")
        self.ref_logp = self.ref_tail = None
        if self.reference is not None:
            for name in ("ref_logp", "ref_tail_logp"):
                if not (self.path / f"{name}.npy").is_file():
                    raise KdrunError(f"data.teacher_cache: {self.path / (name + '.npy')} is missing (an interrupted "
                                     f"write?); write the cache again")
            self.ref_logp = np.load(self.path / "ref_logp.npy", mmap_mode="r")
            self.ref_tail = np.load(self.path / "ref_tail_logp.npy", mmap_mode="r")

    def check(self, data: Any, cfg: Any) -> None:
        """Refuse a cache that does not match the run, naming the first field that differs."""
        m = self.manifest

        def refuse(field: str, cached: Any, run: Any, fix: str) -> None:
            raise KdrunError(f"data.teacher_cache: the cache's {field} is {cached!r} but this run's is {run!r}: {fix} "
                             f"({self.path}/manifest.json)")

        run_sha = fingerprint(data.train)
        if m["dataset_sha256"] != run_sha:
            refuse("dataset_sha256", m["dataset_sha256"][:12], run_sha[:12],
                   "the training split differs (another data set, tokenizer, max length, subset or split seed); write "
                   "the cache with this run's data overrides")
        tok = tokenizer_digest(getattr(data, "tokenizer", None))
        if m.get("tokenizer_sha256") != tok:
            refuse("tokenizer_sha256", m.get("tokenizer_sha256"), tok, "the run tokenises with another tokenizer")
        if self.kind == "scores":
            if int(self.scores.shape[0]) != int(data.num_train):
                refuse("samples", int(self.scores.shape[0]), int(data.num_train), "the training split has other samples")
        elif self.mask_field not in data.train:
            refuse("mask_field", self.mask_field, sorted(data.train), "the run's data has no such field")
        else:
            counts = (data.train[self.mask_field] != 0).sum(dim=1).cpu().numpy()
            if len(counts) + 1 != len(self.offsets) or not np.array_equal(np.diff(self.offsets), counts):
                refuse("tokens", int(self.offsets[-1]), int(counts.sum()), "the scored positions differ per sample")
        models = getattr(cfg, "models", None) or {}
        for entry in [m, *([m["reference"]] if m.get("reference") else [])]:
            model = entry["model"]
            mcfg = models[model] if model in models else (cfg.get(model) if model in ("teacher", "student") and
                                                          hasattr(cfg, "get") else None)
            checkpoint = getattr(mcfg, "checkpoint", None) if mcfg is not None else None
            if checkpoint:
                digest = file_digest(checkpoint)
                if digest is not None and digest != entry.get("checkpoint_sha256"):
                    refuse(f"{model} checkpoint", entry.get("checkpoint"), checkpoint,
                           f"the run's {model} has other weights than the cached one; write the cache from them")

    def read(self, index: Tensor, width: int, device: torch.device | str) -> dict[str, Tensor]:
        """``batch.cache_*`` for the samples ``index`` (host int64), ``width`` positions each."""
        idx = index.numpy() if index.device.type == "cpu" else index.cpu().numpy()
        if self.kind == "scores":
            return {"cache_scores": torch.from_numpy(np.asarray(self.scores[idx], dtype=np.float32)).to(device, non_blocking=True)}
        starts, counts = self.offsets[idx], self.offsets[idx + 1] - self.offsets[idx]
        total = int(counts.sum())
        base = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        rows = base + np.arange(total)
        b = torch.from_numpy(np.repeat(np.arange(len(idx)), counts))
        t = torch.from_numpy(self.positions[rows].astype(np.int64))
        ids = torch.zeros(len(idx), width, self.k, dtype=torch.int64)
        logp = torch.zeros(len(idx), width, self.k, dtype=torch.float32)
        tail = torch.zeros(len(idx), width, dtype=torch.float32)
        ids[b, t] = torch.from_numpy(self.ids[rows].astype(np.int64))
        logp[b, t] = torch.from_numpy(self.logp[rows].astype(np.float32))
        tail[b, t] = torch.from_numpy(self.tail[rows].astype(np.float32))
        dev = torch.device(device)
        out = {"cache_ids": ids.to(dev, non_blocking=True), "cache_logp": logp.to(dev, non_blocking=True),
               "cache_tail": tail.to(dev, non_blocking=True)}
        if self.ref_logp is not None:
            ref_logp = torch.zeros(len(idx), width, self.k, dtype=torch.float32)
            ref_tail = torch.zeros(len(idx), width, dtype=torch.float32)
            ref_logp[b, t] = torch.from_numpy(self.ref_logp[rows].astype(np.float32))
            ref_tail[b, t] = torch.from_numpy(self.ref_tail[rows].astype(np.float32))
            out.update(cache_ref_logp=ref_logp.to(dev, non_blocking=True), cache_ref_tail=ref_tail.to(dev, non_blocking=True))
        return out


def open_cache(path: str, data: Any, cfg: Any) -> TeacherCache:
    """The cache at ``path``, checked against the run (see :meth:`TeacherCache.check`)."""
    if not hasattr(data, "train") or not isinstance(data.train, Mapping):
        raise KdrunError("data.teacher_cache works with token data sets (TensorSplits: text corpora, prompt/response "
                         f"files); {type(data).__name__} has none")
    cache = TeacherCache(path)
    cache.check(data, cfg)
    return cache


__all__ = ["FIELDS", "FORMAT", "TeacherCache", "fingerprint", "manifest_of", "open_cache", "tokenizer_digest"]
