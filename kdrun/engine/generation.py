"""Generation-based evaluation of language models: complete the test prompts, score ROUGE-L.

For prompt/response data (:func:`kdrun.data.text.instructions`): each test example's prompt is
``input_ids[:prompt_length]`` and its reference the tokens it scores (the response). The model completes
the prompts (left-padded batches, Hugging Face ``generate``), greedily or by seeded sampling once per seed;
ROUGE-L F1 (percent) is computed by the ``rouge-score`` package with its Porter stemmer, on text lower-cased
with punctuation removed and whitespace collapsed (MiniLLM's ``rouge_metric.py`` normalises SQuAD-style;
whether it also drops articles was not checked here, so kdrun keeps them: unverified). Sampling reports the mean and standard deviation over seeds (MiniLLM / DistiLLM: 5 seeds,
T = 1, top-k 0, top-p 1).

Configured by the top-level ``generation`` node (null: off)::

    generation: {models: [student], max_new_tokens: 128, do_sample: true, temperature: 1.0, top_p: 1.0,
                 top_k: 0, seeds: [10, 20, 30, 40, 50], max_examples: 500, batch_size: 16}
"""
from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdrun.errors import KdrunError

log = logging.getLogger("kdrun")

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed (the SQuAD-style normalisation of MiniLLM's ROUGE)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F1 in percent per (prediction, reference) pair, by ``rouge_score`` with stemming."""
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise KdrunError("ROUGE-L needs the 'rouge-score' package: pip install -e \".[text]\"") from None
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    out = []
    for p, r in zip(predictions, references):
        p, r = normalize(p), normalize(r)
        out.append(100.0 * scorer.score(r, p)["rougeL"].fmeasure if p and r else 0.0)
    return out


def prompts_and_references(fields: dict[str, Tensor], tokenizer: Any, limit: int | None) -> tuple[list[list[int]], list[str]]:
    """Prompt token ids and reference texts of the test examples (at most ``limit``)."""
    if "prompt_length" not in fields:
        raise KdrunError("generation: the data set has no prompt/response examples (batch.prompt_length); use "
                         "data=instructions, or set generation=null")
    n = fields["input_ids"].shape[0] if limit is None else min(int(limit), fields["input_ids"].shape[0])
    ids, labels, mask, plen = (fields[k][:n].cpu() for k in ("input_ids", "labels", "token_mask", "prompt_length"))
    prompts = [ids[i, :int(plen[i])].tolist() for i in range(n)]
    refs = tokenizer.batch_decode([labels[i][mask[i]].tolist() for i in range(n)], skip_special_tokens=True)
    return prompts, refs


@torch.no_grad()
def complete(model: nn.Module, tokenizer: Any, prompts: list[list[int]], device: torch.device, max_new_tokens: int,
             do_sample: bool, temperature: float, top_p: float, top_k: int, batch_size: int) -> list[str]:
    """The model's completions of ``prompts`` (left-padded batches), decoded without special tokens."""
    if not hasattr(model, "generate"):
        raise KdrunError(f"generation: {type(model).__name__} has no generate(); generation needs a Hugging Face causal LM")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attn[i, width - len(p):] = 1
        # synced_gpus off: one process generates alone (HF would turn it on for a sharded model and wait for the others)
        kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample), "pad_token_id": pad,
                                  "eos_token_id": tokenizer.eos_token_id, "synced_gpus": False}
        if do_sample:
            kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k))
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), **kwargs)
        out += tokenizer.batch_decode(gen[:, width:].cpu(), skip_special_tokens=True)
    model.train(was_training)
    return out


def evaluate_generation(models: dict[str, nn.Module], spec: Any, data: Any, device: torch.device,
                        run_dir: Path) -> dict[str, Any]:
    """ROUGE-L of each model in ``spec.models`` on the test prompts (one pass per seed when sampling);
    completions go to ``generations.jsonl``. Returns ``{model: {rouge_l, rouge_l_std, per_seed, examples}}``."""
    tokenizer = getattr(data, "tokenizer", None)
    if tokenizer is None:
        raise KdrunError("generation: the data set has no tokenizer (use a text data set), or set generation=null")
    prompts, refs = prompts_and_references(data.test, tokenizer, spec.max_examples)
    seeds = list(spec.seeds) if spec.do_sample else [None]
    results: dict[str, Any] = {}
    rows = []
    for name in spec.models:
        if name not in models:
            raise KdrunError(f"generation.models: no model '{name}' in this run ({', '.join(models)})")
        per_seed = []
        for seed in seeds:
            state = torch.random.get_rng_state()
            if seed is not None:
                torch.manual_seed(int(seed))
            texts = complete(models[name], tokenizer, prompts, device, spec.max_new_tokens, spec.do_sample,
                             spec.temperature, spec.top_p, spec.top_k, spec.batch_size)
            torch.random.set_rng_state(state)
            scores = rouge_l(texts, refs)
            per_seed.append(sum(scores) / len(scores))
            rows += [{"model": name, "seed": seed, "index": i, "completion": t, "reference": r, "rouge_l": s}
                     for i, (t, r, s) in enumerate(zip(texts, refs, scores))]
        mean = sum(per_seed) / len(per_seed)
        std = (sum((v - mean) ** 2 for v in per_seed) / (len(per_seed) - 1)) ** 0.5 if len(per_seed) > 1 else 0.0
        results[name] = {"rouge_l": mean, "rouge_l_std": std, "per_seed": per_seed, "examples": len(prompts)}
        log.info("generation: %s ROUGE-L %.2f%s on %d test prompts", name, mean,
                 f" +- {std:.2f} over {len(seeds)} seeds" if len(seeds) > 1 else "", len(prompts))
    with open(Path(run_dir) / "generations.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return results


__all__ = ["complete", "evaluate_generation", "normalize", "prompts_and_references", "rouge_l"]
