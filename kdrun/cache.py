"""``kdrun-cache``: write a model's top-k next-token log-probabilities over the training split to disk.

The recipe and overrides name the data and the model (as for ``kdrun``); the model runs frozen, in eval
mode, over the training split in order, and at every position where the mask field is non-zero its K most
likely tokens, their log-probabilities and the log of the remaining mass are stored (the format:
:mod:`kdrun.data.teacher_cache`). A run then reads them with ``data.teacher_cache=DIR`` and
``kdrun.losses.CachedTokenDivergence``, without the teacher::

    kdrun-cache --model teacher --top-k 32 --out cache/ +recipe=text_quickstart teacher.checkpoint=T.pt
    kdrun +recipe=text_cached_kd data.teacher_cache=cache/

``--reference NAME`` caches a second model beside the first, at the first model's top-k tokens: its
log-probabilities there and the log of its mass elsewhere (ADPA's advantage of an aligned teacher over its
reference, :class:`kdrun.losses.CachedAdvantageLoss`).

The files are written into ``DIR.tmp`` and renamed when complete, so an interrupted write leaves no cache.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdrun.errors import KdrunError


def model_outputs(exp: Any, cfg: Any, model: str, part: str = "train") -> Iterator[tuple[dict[str, Any], Tensor]]:
    """``(batch, logits)`` of ``model`` over the ``part`` split in order, without augmentation, in eval mode and
    without autograd (its mode restored afterwards): the pass of every offline tool (caches, selections)."""
    from kdrun.data.loaders import make_loader

    net = exp.models[model]
    was_training = net.training
    net.eval()
    loader = make_loader(exp.data, part, cfg.data, exp.device, train=False, seed=cfg.seed)
    loader.set_epoch(0)
    try:
        with torch.no_grad():
            for batch in loader:
                ns: dict[str, Any] = {}
                exp.io[model].run(net, batch, ns)
                yield batch, ns[f"{model}.logits"]
    finally:
        net.train(was_training)


TEMPERATURES = tuple(round(0.5 + 0.05 * i, 2) for i in range(51))  # the calibration grid: 0.5, 0.55, ..., 3.0


def calibrate_top_k(logp: Tensor, right: Tensor, grid: tuple[float, ...] = TEMPERATURES) -> dict[str, Any]:
    """FIRST's "trustworthy maximization" (Shum et al., EMNLP 2024): the temperature ``tau`` of the grid that
    minimises the expected calibration error of the cached distribution, ``softmax(logp / tau)`` over its K
    tokens (renormalised). ``logp`` (n, K) top-K log-probabilities in decreasing order at held-out positions,
    ``right`` (n,) whether the top-1 token is the label. Tempering keeps the order, so only the confidence
    ``softmax(logp / tau)_1`` moves. The grid and the renormalisation over K are kdrun's reading of the paper
    (its exact search is not stated in what was read)."""
    from kdrun.engine.evaluate import ECE_BINS

    taus = torch.tensor(grid, dtype=torch.float64)
    conf = torch.softmax(logp.double().unsqueeze(0) / taus.view(-1, 1, 1), dim=-1)[..., 0]  # (grid, n)
    which = (conf * ECE_BINS).long().clamp_(0, ECE_BINS - 1)
    r = right.double().expand_as(conf)
    n = torch.zeros(len(grid), ECE_BINS, dtype=torch.float64).scatter_add_(1, which, torch.ones_like(conf))
    gap = (torch.zeros_like(n).scatter_add_(1, which, conf) - torch.zeros_like(n).scatter_add_(1, which, r)).abs()
    ece = 100.0 * gap.sum(dim=1) / max(1, conf.shape[1])
    best = int(ece.argmin())
    one = grid.index(1.0) if 1.0 in grid else None
    return {"temperature": float(grid[best]), "ece_after": float(ece[best]),
            "ece_before": float(ece[one]) if one is not None else None, "tokens": int(conf.shape[1]),
            "top1_accuracy": 100.0 * float(right.double().mean()) if right.numel() else None, "grid": [grid[0], grid[-1]]}


@torch.no_grad()
def held_out_top_k(exp: Any, cfg: Any, model: str, k: int, mask_field: str) -> tuple[Tensor, Tensor]:
    """The model's top-``k`` log-probabilities (n, k) and whether its top-1 is the label (n,), at every scored
    position of the evaluation split (``data.val_split`` when set, else the test split)."""
    target_field = cfg.data.eval_target
    tops, rights = [], []
    for batch, logits in model_outputs(exp, cfg, model, "test"):
        mask = batch[mask_field][:, :logits.shape[1]] != 0
        top = torch.log_softmax(logits[mask].float(), dim=-1).topk(int(k), dim=-1)
        tops.append(top.values.cpu())
        rights.append((top.indices[:, 0] == batch[target_field][:, :logits.shape[1]][mask]).cpu())
    return torch.cat(tops), torch.cat(rights)


@torch.no_grad()
def write_cache(cfg: Any, model: str, out: str | Path, k: int = 32, dtype: str = "float16",
                mask_field: str = "token_mask", calibrate: bool = False, reference: str | None = None) -> dict[str, Any]:
    """Write the cache of ``model`` (a model of the validated ``cfg``) to ``out``; returns its manifest
    plus ``seconds`` and ``bytes``. ``calibrate``: also fit FIRST's temperature on the evaluation split
    (:func:`calibrate_top_k`) and store it in the manifest (``calibration``). ``reference``: a second model whose
    log-probabilities at ``model``'s top-k tokens and remaining mass are stored too (``ref_logp``, ``ref_tail_logp``)."""
    from kdrun.build import build
    from kdrun.data.teacher_cache import manifest_of
    from kdrun.losses.tokens import _log1mexp

    if dtype not in ("float16", "float32"):
        raise KdrunError(f"kdrun-cache: --dtype must be float16 or float32, got {dtype}")
    if int(k) < 1:
        raise KdrunError(f"kdrun-cache: --top-k must be at least 1, got {k}")
    start = time.perf_counter()
    exp = build(cfg)
    for name, flag in ((model, "--model"), (reference, "--reference")):
        if name is not None and name not in exp.models:
            raise KdrunError(f"kdrun-cache: the recipe's stages do not use a model '{name}' (they use "
                             f"{', '.join(exp.models)}); name one with {flag}")
    if reference == model:
        raise KdrunError(f"kdrun-cache: --reference names the cached model itself ({model}); name another model")
    data = exp.data
    if not hasattr(data, "train") or mask_field not in getattr(data, "train", {}):
        raise KdrunError(f"kdrun-cache: the data has no training field '{mask_field}' (token data sets have token_mask); "
                         f"name the mask with --mask")
    counts = (data.train[mask_field] != 0).sum(dim=1).cpu().numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    width = int(data.train[mask_field].shape[1])
    vocab = exp.shapes.get(f"{model}.logits", (0, 0, 0))[-1]
    if int(k) > int(vocab):
        raise KdrunError(f"kdrun-cache: --top-k {k} exceeds {model}'s vocabulary ({vocab})")
    if reference is not None and exp.shapes.get(f"{reference}.logits", (0,))[-1] != vocab:
        raise KdrunError(f"kdrun-cache: --reference {reference} scores {exp.shapes.get(f'{reference}.logits', (0,))[-1]} "
                         f"tokens, {model} {vocab}; the advantage compares one vocabulary")
    final, tmp = Path(out), Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    store = np.float16 if dtype == "float16" else np.float32
    ids = np.lib.format.open_memmap(tmp / "topk_ids.npy", mode="w+", dtype=np.int32, shape=(total, k))
    logp = np.lib.format.open_memmap(tmp / "topk_logp.npy", mode="w+", dtype=store, shape=(total, k))
    tail = np.lib.format.open_memmap(tmp / "tail_logp.npy", mode="w+", dtype=store, shape=(total,))
    pos_dtype = np.int16 if width <= np.iinfo(np.int16).max else np.int32
    positions = np.lib.format.open_memmap(tmp / "positions.npy", mode="w+", dtype=pos_dtype, shape=(total,))
    if reference is not None:
        ref_logp = np.lib.format.open_memmap(tmp / "ref_logp.npy", mode="w+", dtype=store, shape=(total, k))
        ref_tail = np.lib.format.open_memmap(tmp / "ref_tail_logp.npy", mode="w+", dtype=store, shape=(total,))
    np.save(tmp / "offsets.npy", offsets)
    second = exp.models[reference] if reference is not None else None
    second_mode = second.training if second is not None else False
    if second is not None:
        second.eval()  # frozen like the first model (write_cache runs without autograd)
    row = 0
    for batch, logits in model_outputs(exp, cfg, model):
        mask = batch[mask_field][:, :logits.shape[1]] != 0
        where = mask.nonzero()  # (n, 2): sample-major, positions ascending: the order of the offsets
        lp = torch.log_softmax(logits[mask].float(), dim=-1)
        top = lp.topk(int(k), dim=-1)
        rest = _log1mexp(torch.logsumexp(top.values, dim=-1))
        n = int(where.shape[0])
        ids[row:row + n] = top.indices.cpu().numpy().astype(np.int32)
        logp[row:row + n] = top.values.cpu().numpy().astype(store)
        tail[row:row + n] = rest.cpu().numpy().astype(store)
        positions[row:row + n] = where[:, 1].cpu().numpy().astype(pos_dtype)
        if second is not None:  # the second model on the same batch, read at the first model's top-k tokens
            ns: dict[str, Any] = {}
            exp.io[reference].run(second, batch, ns)
            ref = torch.log_softmax(ns[f"{reference}.logits"][:, :logits.shape[1]][mask].float(), dim=-1).gather(-1, top.indices)
            ref_logp[row:row + n] = ref.cpu().numpy().astype(store)
            ref_tail[row:row + n] = _log1mexp(torch.logsumexp(ref, dim=-1)).cpu().numpy().astype(store)
        row += n
    if second is not None:
        second.train(second_mode)
    if row != total:
        raise KdrunError(f"kdrun-cache: wrote {row} tokens, expected {total} (the loader served another split?)")
    arrays = [ids, logp, tail, positions, *([ref_logp, ref_tail] if reference is not None else [])]
    for arr in arrays:
        arr.flush()
    del arrays, ids, logp, tail, positions
    if reference is not None:
        del ref_logp, ref_tail
    manifest = manifest_of(exp.cfg, data, model, k, dtype, mask_field, counts)
    if reference is not None:
        manifest["reference"] = reference_of(exp.cfg, reference)
    if calibrate:
        split = "validation (data.val_split)" if cfg.data.get("val_split") else "test"
        manifest["calibration"] = {**calibrate_top_k(*held_out_top_k(exp, cfg, model, int(k), mask_field)), "split": split}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    size = sum(f.stat().st_size for f in final.iterdir() if f.suffix == ".npy" and f.name != "offsets.npy")
    return {**manifest, "seconds": time.perf_counter() - start, "bytes": size}


def reference_of(cfg: Any, name: str) -> dict[str, Any]:
    """What the manifest records of a cache's reference model (checked again by every run that reads it)."""
    from kdrun.data.teacher_cache import file_digest

    mcfg = cfg.models[name]
    return {"model": name, "model_name": mcfg.name, "checkpoint": mcfg.checkpoint,
            "checkpoint_sha256": file_digest(mcfg.checkpoint)}


@torch.no_grad()
def write_scores(cfg: Any, model: str, out: str | Path) -> dict[str, Any]:
    """A score cache (:mod:`kdrun.data.teacher_cache`, ``kind: scores``): ``model``'s outputs (its logits, one row
    per sample: a cross-encoder's relevance score) over the training split, in order, as float32 (N, C)."""
    from kdrun.build import build
    from kdrun.data.teacher_cache import manifest_of

    start = time.perf_counter()
    exp = build(cfg)
    if model not in exp.models:
        raise KdrunError(f"kdrun-cache: the recipe's stages do not use a model '{model}' (they use "
                         f"{', '.join(exp.models)}); name one with --model")
    shape = exp.shapes.get(f"{model}.logits")
    if shape is None or len(shape) != 2:
        raise KdrunError(f"kdrun-cache --scores: {model}'s logits have shape {shape}; a score cache holds one row per "
                         f"sample, (N, C) (token models: drop --scores for a top-k cache)")
    data = exp.data
    final, tmp = Path(out), Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    scores = np.lib.format.open_memmap(tmp / "scores.npy", mode="w+", dtype=np.float32,
                                       shape=(int(data.num_train), int(shape[1])))
    for batch, logits in model_outputs(exp, cfg, model):
        scores[batch["index"].cpu().numpy()] = logits.float().cpu().numpy()
    scores.flush()
    del scores
    counts = np.ones(int(data.num_train), dtype=np.int64)
    manifest = {**manifest_of(exp.cfg, data, model, int(shape[1]), "float32", None, counts), "kind": "scores"}
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return {**manifest, "seconds": time.perf_counter() - start, "bytes": (final / "scores.npy").stat().st_size}


def main(argv: list[str] | None = None) -> int:
    from kdrun.config import tool_config

    parser = argparse.ArgumentParser(prog="kdrun-cache", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="teacher", help="the model whose outputs are cached (default teacher)")
    parser.add_argument("--top-k", type=int, default=32, help="tokens kept per position (default 32)")
    parser.add_argument("--out", required=True, help="the cache directory (replaced when the write completes)")
    parser.add_argument("--dtype", default="float16", help="float16 (default) or float32 log-probabilities")
    parser.add_argument("--mask", default="token_mask", help="the batch field of scored positions (default token_mask)")
    parser.add_argument("--scores", action="store_true",
                        help="a score cache: the model's outputs, one row per sample (a cross-encoder's scores)")
    parser.add_argument("--reference", default=None,
                        help="a second model cached at the first one's top-k tokens (ADPA's reference teacher)")
    parser.add_argument("--calibrate", action="store_true",
                        help="fit FIRST's temperature on the evaluation split and store it in the manifest")
    parser.add_argument("overrides", nargs="*", help="+recipe=NAME and overrides, as for kdrun")
    args = parser.parse_args(argv)
    try:
        cfg = tool_config(args.overrides)
        if args.scores:
            info = write_scores(cfg, args.model, args.out)
        else:
            info = write_cache(cfg, args.model, args.out, args.top_k, args.dtype, args.mask, args.calibrate,
                               args.reference)
    except KdrunError as ex:
        print(f"kdrun-cache: {ex}", file=sys.stderr)
        return 2
    if args.scores:
        print(f"kdrun-cache: {info['model']} ({info['model_name']}) scores of {info['samples']} samples ({info['k']} "
              f"per sample) in {info['seconds']:.1f} s -> {args.out}")
        return 0
    print(f"kdrun-cache: {info['model']} ({info['model_name']}) top-{info['k']} over {info['tokens']} tokens of "
          f"{info['samples']} samples in {info['seconds']:.1f} s: {info['bytes'] / max(info['tokens'], 1):.1f} bytes per "
          f"token -> {args.out}" + (f" (with {info['reference']['model']} at the same tokens)" if info.get("reference") else ""))
    cal = info.get("calibration")
    if cal:
        before = f"{cal['ece_before']:.2f}" if cal["ece_before"] is not None else "?"
        print(f"kdrun-cache: calibrated on the {cal['split']} split ({cal['tokens']} tokens, top-1 {cal['top1_accuracy']:.2f}%): "
              f"temperature {cal['temperature']:.2f}, top-{info['k']} ECE {before}% -> {cal['ece_after']:.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
