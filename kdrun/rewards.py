"""Rewards for on-policy training with group advantages (KDRL's GRPO term; :class:`kdrun.data.rollout.Rollout`
with ``reward:``): a function of the sampled completions and the data's reference responses, one value per row.

A reward is any callable ``reward(completion, completion_mask, reference, reference_mask, tokenizer) -> Tensor
(B,)``: ``completion`` (B, M) the sampled tokens (EOS included), ``reference`` (B, R) the data's response tokens,
both left-aligned with boolean masks of the valid entries. ``exact_match`` compares token ids on the device; a
reward that reads text (``final_number_match``) decodes on the host, one string per completion, as every GRPO
implementation's rule rewards do.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def exact_match(completion: Tensor, completion_mask: Tensor, reference: Tensor, reference_mask: Tensor,
                tokenizer: Any = None) -> Tensor:
    """1.0 where the completion's tokens are exactly the reference's (same length, same ids), else 0.0."""
    width = max(completion.shape[1], reference.shape[1])
    pad = lambda x, m: torch.nn.functional.pad(torch.where(m, x, torch.full_like(x, -1)), (0, width - x.shape[1]), value=-1)  # noqa: E731
    return (pad(completion, completion_mask) == pad(reference, reference_mask)).all(dim=1).float()


def _last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "").rstrip(".") if found else None


def final_number_match(completion: Tensor, completion_mask: Tensor, reference: Tensor, reference_mask: Tensor,
                       tokenizer: Any = None) -> Tensor:
    """1.0 where the last number in the completion's text equals the last number in the reference's (GSM8K-style
    answers), else 0.0; decodes both on the host."""
    if tokenizer is None:
        raise ValueError("final_number_match reads text: the data needs a tokenizer")
    rows = []
    for c, cm, r, rm in zip(completion.tolist(), completion_mask.tolist(), reference.tolist(), reference_mask.tolist()):
        got = _last_number(tokenizer.decode([t for t, keep in zip(c, cm) if keep], skip_special_tokens=True))
        want = _last_number(tokenizer.decode([t for t, keep in zip(r, rm) if keep], skip_special_tokens=True))
        rows.append(1.0 if got is not None and got == want else 0.0)
    return torch.tensor(rows, device=completion.device)


__all__ = ["exact_match", "final_number_match"]
