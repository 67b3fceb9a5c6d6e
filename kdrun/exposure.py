"""``kdrun-exposure``: how much of an inserted secret a language model memorised (Carlini et al., "The Secret Sharer",
USENIX Security 2019), the measure of Swing distillation.

A canary is a template with a secret of ``d`` digits, e.g. ``"my PIN is {secret}"``, inserted into the training text
(``data.source.canaries``). Every candidate secret of the space ``R`` (all ``10^d`` strings of d digits) fills the
template; the model's negative log-likelihood of each filled text ranks the candidates, and

    exposure = log2 |R| - log2 rank(secret)

(rank 1: the model prefers the true secret to every other; ``log2 |R|`` is the most there is; an exposure near 1 or
below means the secret is no more likely than a random one)::

    kdrun-exposure --model student --template "my PIN is {secret}" --secret 4071 +recipe=text_swing \\
        student.checkpoint=<run>/student.pt
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Any

import torch
from torch import Tensor

from kdrun.errors import KdrunError

MAX_SPACE = 100_000


@torch.no_grad()
def sequence_nll(model: Any, tokenizer: Any, texts: list[str], device: torch.device, batch_size: int = 512) -> Tensor:
    """(len(texts),) each text's summed next-token negative log-likelihood under ``model`` (a causal LM)."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        ids, attn = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        logits = model(input_ids=ids, attention_mask=attn).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        keep = attn[:, 1:].float()
        out.append(-(logp * keep).sum(dim=1).cpu())
    return torch.cat(out)


def exposure(model: Any, tokenizer: Any, template: str, secret: str, device: torch.device) -> dict[str, Any]:
    """The exposure of ``secret`` (a string of digits) under ``model`` (see the module docstring)."""
    if "{secret}" not in template:
        raise KdrunError("kdrun-exposure: --template must hold {secret}, e.g. \"my PIN is {secret}\"")
    if not secret.isdigit():
        raise KdrunError(f"kdrun-exposure: --secret must be digits, got '{secret}'")
    d = len(secret)
    space = 10 ** d
    if space > MAX_SPACE:
        raise KdrunError(f"kdrun-exposure: a {d}-digit secret has {space} candidates, more than {MAX_SPACE}; use a secret "
                         f"of at most {int(math.log10(MAX_SPACE))} digits")
    candidates = [str(c).zfill(d) for c in range(space)]
    was = model.training
    model.eval()
    try:
        nll = sequence_nll(model, tokenizer, [template.format(secret=c) for c in candidates], device)
    finally:
        model.train(was)
    mine = float(nll[int(secret)])
    rank = 1 + int((nll < mine).sum())
    return {"exposure": math.log2(space) - math.log2(rank), "rank": rank, "candidates": space,
            "max_exposure": math.log2(space), "secret_nll": mine, "median_nll": float(nll.median())}


def main(argv: list[str] | None = None) -> int:
    from kdrun.build import build
    from kdrun.config import tool_config

    parser = argparse.ArgumentParser(prog="kdrun-exposure", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="student", help="the model measured (default student)")
    parser.add_argument("--template", required=True, help="the canary, with {secret} where the digits go")
    parser.add_argument("--secret", required=True, help="the inserted secret (digits)")
    parser.add_argument("overrides", nargs="*", help="+recipe=NAME and overrides (the model's checkpoint), as for kdrun")
    args = parser.parse_args(argv)
    try:
        exp = build(tool_config(args.overrides))
        if args.model not in exp.models:
            raise KdrunError(f"kdrun-exposure: the recipe builds no model '{args.model}' (it builds {', '.join(exp.models)})")
        tok = getattr(exp.data, "tokenizer", None)
        if tok is None:
            raise KdrunError("kdrun-exposure: the data has no tokenizer (a text data set is needed)")
        info = exposure(exp.models[args.model], tok, args.template, args.secret, exp.device)
    except KdrunError as ex:
        print(f"kdrun-exposure: {ex}", file=sys.stderr)
        return 2
    print(f"kdrun-exposure: {args.model}: exposure {info['exposure']:.2f} of at most {info['max_exposure']:.2f} bits (rank "
          f"{info['rank']} of {info['candidates']}; NLL of the secret {info['secret_nll']:.2f}, median {info['median_nll']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
