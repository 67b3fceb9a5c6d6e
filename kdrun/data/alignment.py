"""Teachers and students with different tokenizers: the same text, each model's own tokens, and which
tokens of one correspond to which of the other.

Two things must be aligned when the vocabularies differ (Boizard et al., "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs", 2024; Patino et al., "Unlocking On-Policy
Distillation for Any Model Family" (GOLD), Hugging Face 2025):

- **positions** -- which teacher positions score the same text as which student positions.
  :func:`span_groups` cuts the response into *spans*: the longest pieces on whose end both tokenizations
  agree (a token boundary of each at the same character offset), so every span is a run of one or more
  student tokens and a run of one or more teacher tokens that spell the same characters (GOLD's alignment by
  offsets). :func:`position_groups` pairs the k-th response token of one with the k-th of the other and drops
  the longer tail (ULD's alignment, which ignores the text).
- **vocabularies** -- which teacher token is which student token. :func:`exact_token_map` pairs the ids whose
  single-token strings are identical (and EOS with EOS); the loss
  (:class:`kdrun.losses.cross_tokenizer.CrossTokenizerDivergence`) decides what happens to the rest.

The data source (:func:`kdrun.data.text.instructions` with ``alignment: spans`` or ``positions``) writes,
besides the student's fields, the teacher's own tokenisation of the same examples (its own chat template,
BOS and EOS): ``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels``, ``teacher_token_mask``,
and the alignment: ``span`` (N, L) and ``teacher_span`` (N, L_t), the span index of the token each position
predicts (``-1`` where a position scores nothing or its span has no partner), and ``span_mask`` (N, L), true
at the first student position of every span (what the loss averages over).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("kdrun")

ALIGNMENTS = ("identical", "spans", "positions")
REPLACEMENT = "\ufffd"  # what a lone byte of a multi-byte character decodes to: never matched


def span_groups(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> tuple[list[int], list[int]]:
    """The span index of every student and every teacher token of one text, from each token's end offset.

    A span closes where both tokenizations have a token ending at the same character offset; tokens ending
    at that offset on either side (a character split into several byte tokens) stay in the span. Tokens after
    the last common end (the texts differ at their ends) get ``-1``. ``([2, 5, 6], [1, 2, 6]) -> ([0, 1, 1],
    [0, 0, 1])``.
    """
    s_ids, t_ids = [-1] * len(student_ends), [-1] * len(teacher_ends)
    s = t = s0 = t0 = 0
    span = 0
    while s < len(student_ends) and t < len(teacher_ends):
        a, b = student_ends[s], teacher_ends[t]
        if a < b:
            s += 1
        elif b < a:
            t += 1
        else:
            s, t = s + 1, t + 1
            while s < len(student_ends) and student_ends[s] == a:
                s += 1
            while t < len(teacher_ends) and teacher_ends[t] == a:
                t += 1
            s_ids[s0:s] = [span] * (s - s0)
            t_ids[t0:t] = [span] * (t - t0)
            s0, t0, span = s, t, span + 1
    return s_ids, t_ids


def batched_span_groups(student_ends: Tensor, student_valid: Tensor, teacher_ends: Tensor,
                        teacher_valid: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`span_groups` of a batch of texts at once, with no loop over rows or tokens (rollouts re-tokenise
    every step's completions): ``(N, Ls)`` / ``(N, Lt)`` end offsets, non-decreasing along each row, and masks of
    the real tokens; ``-1`` at padding and after the last common end.

    A span closes at every offset where both sides have a token ending (a *common end*); the token ending at
    ``e`` belongs to span ``#{common ends < e}``, and to none when ``e`` is past the last common end.
    """
    big = 2**62  # past every real offset
    s_e = torch.where(student_valid, student_ends, torch.full_like(student_ends, big)).contiguous()
    t_e = torch.where(teacher_valid, teacher_ends, torch.full_like(teacher_ends, big)).contiguous()
    if s_e.shape[1] == 0 or t_e.shape[1] == 0:
        return torch.full_like(s_e, -1), torch.full_like(t_e, -1)
    at = torch.searchsorted(t_e, s_e).clamp_max(t_e.shape[1] - 1)
    common = student_valid & (t_e.gather(1, at) == s_e)
    prev = torch.cat([torch.full_like(s_e[:, :1], -1), s_e[:, :-1]], dim=1)
    first = common & (s_e != prev)  # one entry per distinct common end
    ends = torch.where(first, s_e, torch.full_like(s_e, big)).sort(dim=1).values
    n = first.sum(dim=1, keepdim=True)

    def span_of(e: Tensor, valid: Tensor) -> Tensor:
        k = torch.searchsorted(ends, e.contiguous())
        return torch.where(valid & (k < n), k, torch.full_like(k, -1))

    return span_of(s_e, student_valid), span_of(t_e, teacher_valid)


def position_groups(n_student: int, n_teacher: int) -> tuple[list[int], list[int]]:
    """ULD's alignment: the k-th token of each side forms span k, for k < min(n_student, n_teacher)."""
    n = min(n_student, n_teacher)
    return list(range(n)) + [-1] * (n_student - n), list(range(n)) + [-1] * (n_teacher - n)


def token_strings(tok: Any) -> list[str]:
    """Every id's string as the tokenizer decodes that id alone (special tokens kept, no clean-up)."""
    n = len(tok)
    return tok.batch_decode([[i] for i in range(n)], skip_special_tokens=False, clean_up_tokenization_spaces=False)


@dataclass
class TokenMap:
    """Pairs of ids (``student[i]`` is ``teacher[i]``) and the vocabulary sizes they were read from."""

    student: list[int]
    teacher: list[int]
    student_size: int
    teacher_size: int
    eos_paired: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        n = len(self.student)
        return (f"{n} token strings in both vocabularies ({100.0 * n / max(1, self.student_size):.1f}% of the student's "
                f"{self.student_size}, {100.0 * n / max(1, self.teacher_size):.1f}% of the teacher's {self.teacher_size})"
                + ("; EOS paired with EOS" if self.eos_paired else ""))


def exact_token_map(student: Sequence[str], teacher: Sequence[str], student_eos: int | None = None,
                    teacher_eos: int | None = None) -> TokenMap:
    """Pair the ids whose strings are equal and unique on both sides (a string two ids of one vocabulary decode
    to, empty strings and strings holding the replacement character of a partial byte sequence are left out);
    then EOS with EOS when neither is paired yet."""
    def unique(strings: Sequence[str]) -> dict[str, int]:
        seen: dict[str, int] = {}
        dup: set[str] = set()
        for i, s in enumerate(strings):
            if not s or REPLACEMENT in s:
                continue
            if s in seen:
                dup.add(s)
            seen[s] = i
        return {s: i for s, i in seen.items() if s not in dup}

    a, b = unique(student), unique(teacher)
    pairs = sorted((a[s], b[s]) for s in a.keys() & b.keys())
    out = TokenMap([p[0] for p in pairs], [p[1] for p in pairs], len(student), len(teacher))
    if student_eos is not None and teacher_eos is not None:
        if student_eos not in out.student and teacher_eos not in out.teacher:
            out.student.append(int(student_eos))
            out.teacher.append(int(teacher_eos))
            out.eos_paired = True
        else:
            out.eos_paired = (student_eos, teacher_eos) in set(zip(out.student, out.teacher))
    return out


def tokenizer_map(student_tok: Any, teacher_tok: Any) -> TokenMap:
    """The exact token map of two tokenizers: first the ids whose vocabulary entries are the same string (one
    family's tokenizers: byte tokens included), then, among the rest, those whose decoded single-id strings are
    equal (across families: ``Ġthe`` and ``▁the`` both decode to `` the``; a lone SentencePiece piece may
    decode without its leading space, so the printed overlap is worth reading)."""
    raw = exact_token_map(student_tok.convert_ids_to_tokens(list(range(len(student_tok)))),
                          teacher_tok.convert_ids_to_tokens(list(range(len(teacher_tok)))),
                          student_tok.eos_token_id, teacher_tok.eos_token_id)
    s_done, t_done = set(raw.student), set(raw.teacher)
    s_str = ["" if i in s_done else x for i, x in enumerate(token_strings(student_tok))]
    t_str = ["" if i in t_done else x for i, x in enumerate(token_strings(teacher_tok))]
    dec = exact_token_map(s_str, t_str)
    pairs = sorted(zip(raw.student + dec.student, raw.teacher + dec.teacher))
    return TokenMap([a for a, _ in pairs], [b for _, b in pairs], len(student_tok), len(teacher_tok),
                    eos_paired=raw.eos_paired)


@dataclass
class SpanStats:
    """What the build prints about an alignment: tokens, spans, and how many are one-to-one."""

    student_tokens: int = 0
    teacher_tokens: int = 0
    spans: int = 0
    one_to_one: int = 0
    dropped_student: int = 0
    dropped_teacher: int = 0

    def add(self, s_ids: Sequence[int], t_ids: Sequence[int]) -> None:
        from collections import Counter

        self.student_tokens += len(s_ids)
        self.teacher_tokens += len(t_ids)
        cs, ct = Counter(i for i in s_ids if i >= 0), Counter(i for i in t_ids if i >= 0)
        self.spans += len(cs)
        self.one_to_one += sum(1 for k, v in cs.items() if v == 1 and ct.get(k) == 1)
        self.dropped_student += sum(1 for i in s_ids if i < 0)
        self.dropped_teacher += sum(1 for i in t_ids if i < 0)

    def summary(self) -> str:
        return (f"{self.student_tokens} student and {self.teacher_tokens} teacher response tokens in {self.spans} aligned "
                f"spans, {100.0 * self.one_to_one / max(1, self.spans):.1f}% of them one token on each side; unaligned "
                f"(not scored): {self.dropped_student} student, {self.dropped_teacher} teacher tokens")


__all__ = ["ALIGNMENTS", "SpanStats", "TokenMap", "batched_span_groups", "exact_token_map", "position_groups", "span_groups", "token_strings",
           "tokenizer_map"]
