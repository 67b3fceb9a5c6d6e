"""``kdrun-select``: MiniPLM's difference sampling (Gu et al., "MiniPLM: Knowledge Distillation for Pre-Training
Language Models", arXiv 2410.17215) -- reshape a pre-training corpus offline with a teacher and a small reference
model, then pre-train a student on what is kept, with no teacher at training time.

Every training example ``x`` (a packed block of ``data=pydoc_text``, or any token data set) is scored by
``r(x) = l_ref(x) - l_T(x)``, the difference of the two models' mean token negative log-likelihoods over its scored
tokens (the authors' ``compute_difference_scores.py``): high where the teacher knows the text better than the
reference does. The ``keep`` fraction (0.5, the authors') with the highest scores is kept, ties broken by index::

    kdrun-select --teacher teacher --reference reference --keep 0.5 --out sel/ +recipe=text_miniplm [weights]
    kdrun +recipe=text_miniplm data.selection=sel/

The directory holds ``selection.json`` (the kept indices, the scores' summary and a manifest: the models, their
checkpoints, the training split's fingerprint) and ``scores.npy`` (every example's score, float32, in order). A run
reading it is refused, naming the field, unless its training split has the same fingerprint.
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
from torch import Tensor

from kdrun.errors import KdrunError


@torch.no_grad()
def mean_nll(exp: Any, cfg: Any, model: str, mask_field: str = "token_mask", target_field: str = "labels") -> Tensor:
    """(N,) every training example's mean token negative log-likelihood under ``model``, in the split's order."""
    from kdrun.cache import model_outputs

    if model not in exp.models:
        raise KdrunError(f"kdrun-select: the recipe builds no model '{model}' (it builds {', '.join(exp.models)}); "
                         f"name one with --teacher / --reference")
    out = torch.zeros(exp.data.num_train, dtype=torch.float64)
    for batch, logits in model_outputs(exp, cfg, model):
        z = logits.float()
        y = batch[target_field][:, :z.shape[1]]
        m = (batch[mask_field][:, :z.shape[1]] != 0).double()
        nll = (torch.logsumexp(z, -1) - z.gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)).double()
        out[batch["index"].cpu()] = ((nll * m).sum(1) / m.sum(1).clamp_min(1)).cpu()
    return out


def keep_top(scores: Tensor, keep: float) -> Tensor:
    """The indices of the ``keep`` fraction (at least one) with the highest scores, ties by index, sorted."""
    if not 0.0 < keep <= 1.0:
        raise KdrunError(f"kdrun-select: --keep must be in (0, 1], got {keep}")
    n = max(1, int(round(keep * scores.numel())))
    order = torch.sort(-scores, stable=True).indices  # stable: equal scores keep their index order
    return order[:n].sort().values


def write_selection(cfg: Any, teacher: str, reference: str, out: str | Path, keep: float = 0.5) -> dict[str, Any]:
    """Score the training split with both models, keep the top fraction, write the directory; returns its manifest."""
    from kdrun.build import build
    from kdrun.data.teacher_cache import file_digest, fingerprint

    start = time.perf_counter()
    exp = build(cfg)
    data = exp.data
    if not isinstance(getattr(data, "train", None), dict):
        raise KdrunError("kdrun-select works with token data sets (TensorSplits: text corpora, prompt/response files)")
    nll_t, nll_r = mean_nll(exp, cfg, teacher), mean_nll(exp, cfg, reference)
    scores = (nll_r - nll_t).float()
    kept = keep_top(scores, keep)
    final, tmp = Path(out), Path(f"{out}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "scores.npy", scores.numpy())
    manifest = {
        "method": "difference sampling (MiniPLM): score = mean NLL(reference) - mean NLL(teacher), top fraction kept",
        "teacher": teacher, "teacher_checkpoint": exp.cfg.models[teacher].checkpoint,
        "teacher_checkpoint_sha256": file_digest(exp.cfg.models[teacher].checkpoint),
        "reference": reference, "reference_checkpoint": exp.cfg.models[reference].checkpoint,
        "keep": float(keep), "samples": int(scores.numel()), "kept_samples": int(kept.numel()),
        "dataset": cfg.data.name, "dataset_sha256": fingerprint(data.train),
        "score_mean": float(scores.mean()), "score_kept_min": float(scores[kept].min()),
        "teacher_nll": float(nll_t.mean()), "reference_nll": float(nll_r.mean()),
        "kept": kept.tolist(),
    }
    (tmp / "selection.json").write_text(json.dumps(manifest))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return {**manifest, "seconds": time.perf_counter() - start}


def open_selection(path: str, splits: Any) -> Any:
    """``splits`` restricted to the training examples a ``kdrun-select`` directory kept, after checking that it was
    computed on this training split."""
    from kdrun.data.teacher_cache import fingerprint

    file = Path(path) / "selection.json"
    if not file.is_file():
        raise KdrunError(f"data.selection: {path} holds no selection.json; write one with kdrun-select --out {path} ...")
    if not hasattr(splits, "select") or not isinstance(getattr(splits, "train", None), dict):
        raise KdrunError(f"data.selection works with token data sets (TensorSplits); this one is {type(splits).__name__}")
    m = json.loads(file.read_text())
    run_sha = fingerprint(splits.train)
    if m.get("dataset_sha256") != run_sha:
        raise KdrunError(f"data.selection: the selection's dataset_sha256 is {str(m.get('dataset_sha256'))[:12]} but this "
                         f"run's training split is {run_sha[:12]}: it was scored on other data (another corpus, tokenizer, "
                         f"block length or split seed); run kdrun-select with this run's data overrides ({file})")
    return splits.select(torch.tensor(m["kept"], dtype=torch.long))


def main(argv: list[str] | None = None) -> int:
    from kdrun.config import tool_config

    parser = argparse.ArgumentParser(prog="kdrun-select", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="teacher", help="the model that knows the text (default teacher)")
    parser.add_argument("--reference", default="reference", help="the small reference model (default reference)")
    parser.add_argument("--keep", type=float, default=0.5, help="the fraction kept (default 0.5)")
    parser.add_argument("--out", required=True, help="the selection directory (replaced when the write completes)")
    parser.add_argument("overrides", nargs="*", help="+recipe=NAME and overrides, as for kdrun")
    args = parser.parse_args(argv)
    try:
        cfg = tool_config(args.overrides)
        info = write_selection(cfg, args.teacher, args.reference, args.out, args.keep)
    except KdrunError as ex:
        print(f"kdrun-select: {ex}", file=sys.stderr)
        return 2
    print(f"kdrun-select: kept {info['kept_samples']} of {info['samples']} examples (keep {info['keep']}); mean NLL "
          f"teacher {info['teacher_nll']:.3f}, reference {info['reference_nll']:.3f}; in {info['seconds']:.1f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
