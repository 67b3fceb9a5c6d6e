"""``kdrun-search``: DisWOT's training-free student search (Dong, Li & Wei, CVPR 2023).

Each candidate student is built at initialisation (random weights, seeded) beside the recipe's teacher; one
training batch (the first of the seeded training order, augmented as in training) goes through both, in
eval mode without autograd (a student identical to the teacher scores 0); the recipe's DisWOT terms give the semantic metric ``M_s`` and the relation
metric ``M_r`` (un-normalised, as the paper ranks by them), and the candidates are ranked by ``M_s + M_r``
(lower first: closer to the teacher). The paper searches a space by evolution; kdrun ranks the candidate list
it is given (a list of zoo names, or a sweep's worth) and prints a table and writes JSON::

    kdrun-search --candidates resnet8x4,wrn_16_2,shufflenetv2 teacher=resnet32x4 teacher.checkpoint=T.pt

Arguments after the options are the recipe's overrides (default recipe ``cifar100_diswot``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

from kdrun.errors import KdrunError


def _metric_terms(exp: Any) -> dict[str, str]:
    from kdrun.losses import DisWOTRelationLoss, DisWOTSemanticLoss

    found = {}
    for name, spec in exp.losses.items():
        if isinstance(spec.module, DisWOTSemanticLoss):
            found["semantic"] = name
        elif isinstance(spec.module, DisWOTRelationLoss):
            found["relation"] = name
    if set(found) != {"semantic", "relation"}:
        raise KdrunError("kdrun-search: the recipe needs a DisWOTSemanticLoss and a DisWOTRelationLoss term "
                         "(as cifar100_diswot has)")
    return found


@torch.no_grad()
def score(cfg: Any) -> dict[str, float]:
    """``M_s``, ``M_r`` and their sum for the student of ``cfg`` (validated) at initialisation, on one batch."""
    from kdrun.build import build
    from kdrun.data.loaders import make_loader
    from kdrun.names import gather

    torch.manual_seed(cfg.seed)
    exp = build(cfg)
    terms = _metric_terms(exp)
    loader = make_loader(exp.data, "train", exp.cfg.data, exp.device, train=True, seed=exp.cfg.seed)
    loader.set_epoch(0)
    batch = next(iter(loader))
    if exp.batch_transform is not None:
        batch = exp.batch_transform(batch)
    ns: dict[str, Any] = {f"batch.{k}": v for k, v in batch.items()}
    exp.models["teacher"].eval()
    exp.io["teacher"].run(exp.models["teacher"], batch, ns)
    exp.models["student"].eval()
    exp.io["student"].run(exp.models["student"], batch, ns)
    out = {}
    for key, name in terms.items():
        module = exp.losses[name].module
        module.normalize_loss = False
        out[key] = float(module(**gather(ns, exp.losses[name].inputs)))
    out["score"] = out["semantic"] + out["relation"]
    out["params_m"] = sum(p.numel() for p in exp.models["student"].parameters()) / 1e6
    return out


def rank(candidates: list[str], overrides: list[str], recipe: str = "cifar100_diswot") -> list[dict[str, Any]]:
    """Every candidate's scores, best (lowest ``M_s + M_r``) first."""
    from kdrun.config import validate
    from kdrun.registry import compose_config

    rows = []
    for name in candidates:
        cfg = validate(compose_config([f"student={name}", *overrides], recipe))
        rows.append({"student": name, **score(cfg)})
    rows.sort(key=lambda r: r["score"])
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| rank | student | M_s | M_r | M_s + M_r | params (M) |", "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['rank']} | {r['student']} | {r['semantic']:.4f} | {r['relation']:.4f} | {r['score']:.4f} | {r['params_m']:.2f} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kdrun-search", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", required=True, help="comma-separated student names (zoo or model configs)")
    parser.add_argument("--recipe", default="cifar100_diswot", help="the recipe with the DisWOT terms (default cifar100_diswot)")
    parser.add_argument("--out", default="diswot_search.json", help="where the ranking is written as JSON")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. teacher=resnet32x4 teacher.checkpoint=PATH")
    args = parser.parse_args(argv)
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    if not candidates:
        parser.error("--candidates is empty")
    try:
        rows = rank(candidates, args.overrides, args.recipe)
    except KdrunError as ex:
        print(f"kdrun-search: {ex}", file=sys.stderr)
        return 2
    print(table(rows))
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
