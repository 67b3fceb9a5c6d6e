"""``kdrun-cache``: write a model's top-k next-token log-probabilities over the training split to disk.

The recipe and overrides name the data and the model (as for ``kdrun``); the model runs frozen, in eval
mode, over the training split in order, and at every position where the mask field is non-zero its K most
likely tokens, their log-probabilities and the log of the remaining mass are stored (the format:
:mod:`kdrun.data.teacher_cache`). A run then reads them with ``data.teacher_cache=DIR`` and
``kdrun.losses.CachedTokenDivergence``, without the teacher::

    kdrun-cache --model teacher --top-k 32 --out cache/ +recipe=text_quickstart teacher.checkpoint=T.pt
    kdrun +recipe=text_cached_kd data.teacher_cache=cache/

The files are written into ``DIR.tmp`` and renamed when complete, so an interrupted write leaves no cache.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdrun.errors import KdrunError


@torch.no_grad()
def write_cache(cfg: Any, model: str, out: str | Path, k: int = 32, dtype: str = "float16",
                mask_field: str = "token_mask") -> dict[str, Any]:
    """Write the cache of ``model`` (a model of the validated ``cfg``) to ``out``; returns its manifest
    plus ``seconds`` and ``bytes``."""
    from kdrun.build import build
    from kdrun.data.loaders import make_loader
    from kdrun.data.teacher_cache import manifest_of
    from kdrun.losses.tokens import _log1mexp

    if dtype not in ("float16", "float32"):
        raise KdrunError(f"kdrun-cache: --dtype must be float16 or float32, got {dtype}")
    if int(k) < 1:
        raise KdrunError(f"kdrun-cache: --top-k must be at least 1, got {k}")
    start = time.perf_counter()
    exp = build(cfg)
    if model not in exp.models:
        raise KdrunError(f"kdrun-cache: the recipe's stages do not use a model '{model}' (they use "
                         f"{', '.join(exp.models)}); name one with --model")
    data = exp.data
    if not hasattr(data, "train") or mask_field not in getattr(data, "train", {}):
        raise KdrunError(f"kdrun-cache: the data has no training field '{mask_field}' (token data sets have token_mask); "
                         f"name the mask with --mask")
    counts = (data.train[mask_field] != 0).sum(dim=1).cpu().numpy().astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    width = int(data.train[mask_field].shape[1])
    net = exp.models[model]
    vocab = exp.shapes.get(f"{model}.logits", (0, 0, 0))[-1]
    if int(k) > int(vocab):
        raise KdrunError(f"kdrun-cache: --top-k {k} exceeds {model}'s vocabulary ({vocab})")
    final, tmp = Path(out), Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    store = np.float16 if dtype == "float16" else np.float32
    ids = np.lib.format.open_memmap(tmp / "topk_ids.npy", mode="w+", dtype=np.int32, shape=(total, k))
    logp = np.lib.format.open_memmap(tmp / "topk_logp.npy", mode="w+", dtype=store, shape=(total, k))
    tail = np.lib.format.open_memmap(tmp / "tail_logp.npy", mode="w+", dtype=store, shape=(total,))
    pos_dtype = np.int16 if width <= np.iinfo(np.int16).max else np.int32
    positions = np.lib.format.open_memmap(tmp / "positions.npy", mode="w+", dtype=pos_dtype, shape=(total,))
    np.save(tmp / "offsets.npy", offsets)
    was_training = net.training
    net.eval()
    loader = make_loader(data, "train", cfg.data, exp.device, train=False, seed=cfg.seed)
    loader.set_epoch(0)
    row = 0
    try:
        for batch in loader:
            ns: dict[str, Any] = {}
            exp.io[model].run(net, batch, ns)
            logits = ns[f"{model}.logits"]
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
            row += n
    finally:
        net.train(was_training)
    if row != total:
        raise KdrunError(f"kdrun-cache: wrote {row} tokens, expected {total} (the loader served another split?)")
    for arr in (ids, logp, tail, positions):
        arr.flush()
    del ids, logp, tail, positions
    manifest = manifest_of(exp.cfg, data, model, k, dtype, mask_field, counts)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    size = sum(f.stat().st_size for f in final.iterdir() if f.suffix == ".npy" and f.name != "offsets.npy")
    return {**manifest, "seconds": time.perf_counter() - start, "bytes": size}


def main(argv: list[str] | None = None) -> int:
    from kdrun.config import validate
    from kdrun.registry import compose_config

    parser = argparse.ArgumentParser(prog="kdrun-cache", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="teacher", help="the model whose outputs are cached (default teacher)")
    parser.add_argument("--top-k", type=int, default=32, help="tokens kept per position (default 32)")
    parser.add_argument("--out", required=True, help="the cache directory (replaced when the write completes)")
    parser.add_argument("--dtype", default="float16", help="float16 (default) or float32 log-probabilities")
    parser.add_argument("--mask", default="token_mask", help="the batch field of scored positions (default token_mask)")
    parser.add_argument("overrides", nargs="*", help="+recipe=NAME and overrides, as for kdrun")
    args = parser.parse_args(argv)
    recipe = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("+recipe=")), None)
    overrides = [o for o in args.overrides if not o.startswith("+recipe=")]
    try:
        cfg = validate(compose_config(overrides, recipe))
        info = write_cache(cfg, args.model, args.out, args.top_k, args.dtype, args.mask)
    except KdrunError as ex:
        print(f"kdrun-cache: {ex}", file=sys.stderr)
        return 2
    print(f"kdrun-cache: {info['model']} ({info['model_name']}) top-{info['k']} over {info['tokens']} tokens of "
          f"{info['samples']} samples in {info['seconds']:.1f} s: {info['bytes'] / max(info['tokens'], 1):.1f} bytes per "
          f"token -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
