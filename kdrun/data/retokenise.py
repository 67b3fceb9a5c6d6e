"""Rollouts for a teacher and a student with different tokenizers: the sampled completions as text, tokenised
again by each model's own tokenizer, and aligned as the data source aligns its examples.

When the data carry the teacher's own tokenisation of every example (``data.source.alignment`` ``spans`` or
``positions``, :mod:`kdrun.data.alignment`), a completion sampled by one model cannot be handed to the other as
token ids. :class:`kdrun.data.rollout.Rollout` then

1. decodes each completion with the sampling model's tokenizer, up to its first EOS (:func:`completion_texts`);
2. tokenises the texts with both tokenizers, in one batched call each, with character offsets; each side gets its
   own EOS when the completion ended with one (:func:`tokenise_completions`);
3. aligns the two tokenisations on their character offsets (:func:`kdrun.data.alignment.batched_span_groups`) or
   position by position, exactly as the data source aligns a response (EOS pairs with EOS, in a span of its own);
4. writes each model's prompt (kept from the batch) followed by its tokens of the completion
   (:func:`place_spans`, :func:`kdrun.data.rollout.rebuild`).

So sequence-level KD across tokenizers (the teacher samples, the student is trained on the text; Kim & Rush,
EMNLP 2016) and on-policy span-aligned distillation (the student samples, the teacher scores the same text with
its own tokens; GOLD, Patino et al., Hugging Face 2025) run in one step. The sampling model's own ids are
replaced by its tokenizer's tokenisation of the decoded text: the same characters, and the same ids except
where the sample was not its text's canonical tokenisation.

The tokenizers run on the host (one batched call per side per micro-batch); offsets, spans and the rebuilt
fields are computed with tensor operations, no loop over rows or tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kdrun.data.alignment import batched_span_groups


@dataclass
class CompletionTokens:
    """Both tokenisations of a batch of completion texts: right-padded ids, lengths (EOS included when the
    completion ended with one), and the span of every token (``-1``: aligned with nothing)."""

    student_ids: Tensor
    student_lengths: Tensor
    student_span: Tensor
    teacher_ids: Tensor
    teacher_lengths: Tensor
    teacher_span: Tensor


def completion_texts(completions: Tensor, eos_id: int | None, tokenizer: Any) -> tuple[list[str], Tensor]:
    """The text of every completion (B, M) up to its first EOS (excluded), and whether it had one (B,).

    Special tokens inside a completion are kept in its text (a chat template's markers), so each tokenizer
    reads them again as its own."""
    b, m = completions.shape
    if eos_id is None:
        finished = torch.zeros(b, dtype=torch.bool, device=completions.device)
        lengths = torch.full((b,), m, device=completions.device)
    else:
        is_eos = completions == eos_id
        finished = is_eos.any(dim=1)
        lengths = torch.where(finished, is_eos.float().argmax(dim=1), torch.full((b,), m, device=completions.device))
    rows, keep = completions.tolist(), lengths.tolist()  # one copy to the host: the tokenizer reads lists
    texts = tokenizer.batch_decode([r[:n] for r, n in zip(rows, keep)], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    return texts, finished


def _encode(tokenizer: Any, texts: list[str], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(ids, lengths, end offsets), right-padded, of ``texts`` tokenised without special tokens."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, padding=True, return_tensors="pt",
                    padding_side="right")
    b = len(texts)
    ids = enc["input_ids"].reshape(b, -1).to(device)
    valid = enc["attention_mask"].reshape(b, -1).to(device).bool()
    ends = enc["offset_mapping"].reshape(b, -1, 2)[..., 1].to(device)
    return ids, valid, ends


def _with_eos(ids: Tensor, lengths: Tensor, finished: Tensor, eos_id: int | None, pad_id: int) -> tuple[Tensor, Tensor]:
    """``ids`` with ``eos_id`` written after the last token of every finished row (one more column)."""
    ids = torch.cat([ids, torch.full_like(ids[:, :1], pad_id)], dim=1)
    if eos_id is None:
        return ids, lengths
    add = finished.to(lengths.dtype)
    col = lengths.view(-1, 1)
    ids = ids.scatter(1, col, torch.where(finished.view(-1, 1), torch.full_like(col, eos_id), ids.gather(1, col)))
    return ids, lengths + add


def tokenise_completions(texts: list[str], finished: Tensor, student_tok: Any, teacher_tok: Any, alignment: str,
                         device: torch.device) -> CompletionTokens:
    """Each model's tokens of every completion text, and their alignment (``spans`` or ``positions``).

    EOS follows the data source's rule (:func:`kdrun.data.text.instructions`): a finished completion gets the
    student's EOS and, when the teacher has one, the teacher's, the two forming one more span."""
    s_ids, s_valid, s_ends = _encode(student_tok, texts, device)
    t_ids, t_valid, t_ends = _encode(teacher_tok, texts, device)
    s_len, t_len = s_valid.sum(dim=1), t_valid.sum(dim=1)
    if alignment == "spans":
        s_span, t_span = batched_span_groups(s_ends, s_valid, t_ends, t_valid)
    elif alignment == "positions":
        both = torch.minimum(s_len, t_len).view(-1, 1)
        s_pos = torch.arange(s_ids.shape[1], device=device).view(1, -1)
        t_pos = torch.arange(t_ids.shape[1], device=device).view(1, -1)
        s_span = torch.where(s_pos < both, s_pos, torch.full_like(s_pos, -1)).expand_as(s_ids).clone()
        t_span = torch.where(t_pos < both, t_pos, torch.full_like(t_pos, -1)).expand_as(t_ids).clone()
    else:
        raise ValueError(f"tokenise_completions: alignment must be spans or positions, got '{alignment}'")
    s_eos, t_eos = student_tok.eos_token_id, teacher_tok.eos_token_id
    s_pad = student_tok.pad_token_id if student_tok.pad_token_id is not None else 0
    t_pad = teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else 0
    last = s_span.max(dim=1).values.clamp_min(-1) + 1 if s_span.shape[1] else torch.zeros_like(s_len)
    s_done = finished & (s_eos is not None)
    t_done = finished & (t_eos is not None)
    eos_span = torch.where(t_done, last, torch.full_like(last, -1)).view(-1, 1)
    s_span = torch.cat([s_span, torch.full_like(s_span[:, :1], -1)], dim=1).scatter(
        1, s_len.view(-1, 1), torch.where(s_done.view(-1, 1), eos_span, torch.full_like(eos_span, -1)))
    t_span = torch.cat([t_span, torch.full_like(t_span[:, :1], -1)], dim=1).scatter(
        1, t_len.view(-1, 1), torch.where(t_done.view(-1, 1), last.view(-1, 1), torch.full_like(eos_span, -1)))
    s_ids, s_len = _with_eos(s_ids, s_len, s_done, s_eos, s_pad)
    t_ids, t_len = _with_eos(t_ids, t_len, t_done, t_eos, t_pad)
    return CompletionTokens(s_ids, s_len, s_span, t_ids, t_len, t_span)


def place_spans(completion_span: Tensor, prompt_len: Tensor, width: int) -> Tensor:
    """(B, width) span ids at the positions that predict the completion's tokens (``-1`` elsewhere)."""
    from kdrun.data.rollout import at_prediction_positions

    return at_prediction_positions(completion_span, prompt_len, width, -1)


def first_of_span(span: Tensor) -> Tensor:
    """True at the first position of every span (what span-aligned losses average over)."""
    prev = torch.cat([torch.full_like(span[:, :1], -1), span[:, :-1]], dim=1)
    return (span >= 0) & (span != prev)


__all__ = ["CompletionTokens", "completion_texts", "first_of_span", "place_spans", "tokenise_completions"]
