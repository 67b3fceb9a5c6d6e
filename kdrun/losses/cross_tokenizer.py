"""Token-level distillation between a teacher and a student whose tokenizers differ.

The data give each model its own tokens of the same text and the spans that align them
(:mod:`kdrun.data.alignment`: ``data.source.alignment: spans`` or ``positions``). Per span ``g`` of a
response, each model's next-token distributions at the positions of the span are merged into one
(unnormalised) distribution over its own vocabulary, as GOLD does (Patino et al., "Unlocking On-Policy
Distillation for Any Model Family", Hugging Face 2025; TRL ``GOLDTrainer``):

- ``merge: observed`` (default): the distribution at the span's first position times the probabilities the
  model gives the span's later (observed) tokens, ``r_g(v) = q_{t0}(v) prod_{t > t0} q_t(y_t)``;
- ``merge: last``: the distribution at its last position times the probabilities of the earlier observed tokens
  (TRL's "bayesian" strategy), ``r_g(v) = q_{t1}(v) prod_{t < t1} q_t(y_t)``.

A span of one token on each side is that position's distribution. The merged teacher ``p_g`` and student ``q_g``
are then compared over the vocabularies by ``vocab``:

- ``exact_map`` (default): both normalised, restricted to the token pairs whose strings are identical
  (:func:`kdrun.data.alignment.exact_token_map`, EOS paired with EOS) plus one tail bucket holding each
  model's remaining mass, and compared by ``divergence(kind)`` (fkl, rkl, jsd with ``teacher_mix``, skl/srkl
  with ``skew``, tvd: :func:`kdrun.losses.tokens.divergence`). With identical vocabularies and one-token
  spans this is the token-level divergence itself (the tail is empty).
- ``hybrid`` (GOLD's hybrid ULD loss): ``matched_weight * D(p_g^M, q_g^M) + unmatched_weight * sum_i |sort(p_g^U)_i
  - sort(q_g^U)_i|``: ``D = divergence(kind)`` over the matched ids, each side renormalised over them; the sorted
  L1 over the unmatched ids' (unnormalised) merged probabilities, the shorter side zero-padded. ``matched_weight:
  null`` takes TRL's adaptive weight, the matched share of the teacher's vocabulary, and ``1 -`` it for the rest.
- ``uld``: ``sum_i |sort(p_g)_i - sort(q_g)_i|`` over the whole vocabularies (Boizard et al. 2024, "Towards
  Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs"), token identities ignored;
  no tokenizer is needed.

The value is the mean over the aligned spans of the micro-batch (``mask``: ``batch.span_mask``, one entry per
span), which the engine turns into the mean over every span of the optimizer step. Where kdrun differs from
TRL: ``exact_map`` and the matched part of ``hybrid`` compare normalised distributions (TRL feeds the
unnormalised merged probabilities to its JSD); the ULD L1 is summed over the vocabulary and averaged over
spans, as in ULD's definition.

Memory: the merge and the comparison run over chunks of ``chunk_rows`` sequences, each checkpointed, so the
float32 (spans x vocabulary) tensors of both models exist for one chunk at a time.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdrun.losses.base import LossTerm
from kdrun.losses.tokens import DIVERGENCES, LOG_FLOOR, _log1mexp, divergence, log_probs

VOCAB_MODES = ("exact_map", "hybrid", "uld")
MERGES = ("observed", "last")


def merge_spans(logits: Tensor, target: Tensor, span: Tensor, groups: int, merge: str = "observed",
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """(B * groups, V) log merged distributions of the spans (unnormalised, see the module docstring) and which
    of them exist. ``span`` (B, L) is the span of the token each position predicts (``-1``: none), ``target``
    (B, L) that token; spans are contiguous runs of positions, numbered from 0 within each sequence."""
    b, length, v = logits.shape
    logq = log_probs(logits, temperature)
    valid = span >= 0
    observed = logq.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * valid
    edge = torch.full((b, 1), -1, dtype=span.dtype, device=span.device)
    other = torch.cat([edge, span[:, :-1]], 1) if merge == "observed" else torch.cat([span[:, 1:], edge], 1)
    base = valid & (span != other)  # the span's first (observed) or last position
    row = torch.arange(b, device=span.device).view(-1, 1) * groups + span.clamp_min(0)
    dump = b * groups  # positions that are not a span's base land in one extra row, dropped
    at_base = torch.where(base, row, dump).reshape(-1)
    merged = logq.new_zeros(b * groups + 1, v).index_add_(0, at_base, logq.reshape(-1, v))
    scalars = logq.new_zeros(b * groups + 1).index_add_(0, torch.where(valid, row, dump).reshape(-1),
                                                        (observed * ~base).reshape(-1))
    present = logq.new_zeros(b * groups + 1).index_add_(0, at_base, base.reshape(-1).to(logq.dtype)) > 0
    return (merged + scalars.unsqueeze(-1))[:-1], present[:-1]


def sorted_l1(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``sum_i |sort(p)_i - sort(q)_i|`` per row, probabilities sorted in decreasing order, the shorter zero-padded."""
    p, q = log_p.exp().sort(dim=-1, descending=True).values, log_q.exp().sort(dim=-1, descending=True).values
    width = max(p.shape[-1], q.shape[-1])
    p, q = F.pad(p, (0, width - p.shape[-1])), F.pad(q, (0, width - q.shape[-1]))
    return (p - q).abs().sum(dim=-1)


def _with_tail(log_x: Tensor) -> Tensor:
    """Normalised log-probabilities of a subset plus one bucket for the rest (``log(1 - sum)``)."""
    return torch.cat([log_x, _log1mexp(torch.logsumexp(log_x, dim=-1, keepdim=True))], dim=-1).clamp_min(LOG_FLOOR)


class CrossTokenizerDivergence(LossTerm):
    """Distillation across tokenizers over aligned spans (see the module docstring for the formulas).

    Args:
        student_tokenizer, teacher_tokenizer: the tokenizers (specs as ``data.source.tokenizer``), for the exact
            token map of ``exact_map`` and ``hybrid``; or ``token_map: {student: [ids], teacher: [ids]}``, pairs
            given by hand. ``uld`` needs neither.
        vocab: ``exact_map`` (default), ``hybrid`` or ``uld``. kind (fkl), teacher_mix (0.5), skew (0.1): the
            divergence of ``exact_map`` / ``hybrid``. merge: ``observed`` (default) or ``last``.
        matched_weight (1.0; null: adaptive), unmatched_weight (1.0): ``hybrid``'s weights.
        temperature: divides both models' logits (1.0). chunk_rows: sequences per checkpointed chunk (1).
    """

    mean_over = "tokens"

    def __init__(self, student_tokenizer: Any = None, teacher_tokenizer: Any = None, vocab: str = "exact_map",
                 kind: str = "fkl", teacher_mix: float = 0.5, skew: float = 0.1, merge: str = "observed",
                 matched_weight: float | None = 1.0, unmatched_weight: float = 1.0, temperature: float = 1.0,
                 chunk_rows: int = 1, token_map: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if vocab not in VOCAB_MODES:
            raise ValueError(f"cross-tokenizer divergence: vocab must be one of {', '.join(VOCAB_MODES)}, got '{vocab}'")
        if kind not in DIVERGENCES:
            raise ValueError(f"cross-tokenizer divergence: kind must be one of {', '.join(DIVERGENCES)}, got '{kind}'")
        if merge not in MERGES:
            raise ValueError(f"cross-tokenizer divergence: merge must be observed or last, got '{merge}'")
        if temperature <= 0 or int(chunk_rows) < 1:
            raise ValueError(f"cross-tokenizer divergence: need temperature > 0 and chunk_rows >= 1, got {temperature}, {chunk_rows}")
        self.vocab, self.kind, self.teacher_mix, self.skew, self.merge = vocab, kind, float(teacher_mix), float(skew), merge
        self.matched_weight = None if matched_weight is None else float(matched_weight)
        self.unmatched_weight, self.temperature, self.chunk_rows = float(unmatched_weight), float(temperature), int(chunk_rows)
        self.pairs: tuple[list[int], list[int]] | None = None
        self.adaptive = 0.0  # hybrid with matched_weight null: the matched share of the teacher vocabulary (setup)
        self.map_summary = ""
        if vocab != "uld":
            self.pairs = self._pairs(student_tokenizer, teacher_tokenizer, token_map)
        self.register_buffer("s_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("t_ids", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("s_rest", torch.zeros(0, dtype=torch.long), persistent=False)
        self.register_buffer("t_rest", torch.zeros(0, dtype=torch.long), persistent=False)

    def _pairs(self, student_tokenizer: Any, teacher_tokenizer: Any, token_map: Mapping[str, Any] | None) -> tuple[list[int], list[int]]:
        if token_map is not None:
            s, t = [int(i) for i in token_map["student"]], [int(i) for i in token_map["teacher"]]
            if len(s) != len(t) or len(set(s)) != len(s) or len(set(t)) != len(t):
                raise ValueError("cross-tokenizer divergence: token_map needs lists of equal length without repeated ids")
            return s, t
        if student_tokenizer is None or teacher_tokenizer is None:
            raise ValueError(f"cross-tokenizer divergence: vocab={self.vocab} pairs tokens by their strings, so it needs "
                             f"student_tokenizer and teacher_tokenizer (e.g. ${{data.source.tokenizer}} and "
                             f"${{data.source.teacher_tokenizer}}), or a hand-made token_map; vocab=uld needs neither")
        from kdrun.data.alignment import tokenizer_map
        from kdrun.data.text import load_tokenizer

        m = tokenizer_map(load_tokenizer(student_tokenizer, "student_tokenizer"), load_tokenizer(teacher_tokenizer, "teacher_tokenizer"))
        self.map_summary = m.summary()
        if not m.student:
            raise ValueError("cross-tokenizer divergence: the two vocabularies share no token string; use vocab=uld")
        return m.student, m.teacher

    def check_shapes(self, student: torch.Size, teacher: torch.Size, student_target: torch.Size,  # type: ignore[override]
                     teacher_target: torch.Size, span: torch.Size, teacher_span: torch.Size, mask: torch.Size) -> None:
        if len(student) != 3 or len(teacher) != 3:
            raise ValueError(f"cross-tokenizer divergence: student and teacher must be logits (B, L, V), got "
                             f"{tuple(student)} and {tuple(teacher)}")
        for name, got, want in (("student_target", student_target, student[:2]), ("span", span, student[:2]),
                                ("mask", mask, student[:2]), ("teacher_target", teacher_target, teacher[:2]),
                                ("teacher_span", teacher_span, teacher[:2])):
            if tuple(got) != tuple(want):
                raise ValueError(f"cross-tokenizer divergence: '{name}' has shape {tuple(got)}, expected {tuple(want)} "
                                 f"(the data's span fields come with data.source.alignment=spans or positions)")
        if self.pairs is not None:
            vs, vt = int(student[-1]), int(teacher[-1])
            if max(self.pairs[0]) >= vs or max(self.pairs[1]) >= vt:
                raise ValueError(f"cross-tokenizer divergence: the token map reaches id {max(self.pairs[0])} (student) / "
                                 f"{max(self.pairs[1])} (teacher) but the logits have {vs} / {vt} entries: the "
                                 f"tokenizers do not belong to these models")

    def setup(self, ctx: Any) -> None:
        if self.pairs is None:
            return
        vs, vt = int(ctx.shapes["student"][-1]), int(ctx.shapes["teacher"][-1])
        s, t = torch.tensor(self.pairs[0], dtype=torch.long), torch.tensor(self.pairs[1], dtype=torch.long)
        s_rest, t_rest = torch.ones(vs, dtype=torch.bool), torch.ones(vt, dtype=torch.bool)
        s_rest[s], t_rest[t] = False, False
        self.s_ids, self.t_ids = s.to(ctx.device), t.to(ctx.device)
        self.s_rest, self.t_rest = s_rest.nonzero().view(-1).to(ctx.device), t_rest.nonzero().view(-1).to(ctx.device)
        if self.matched_weight is None:
            self.adaptive = len(self.pairs[1]) / vt
        if self.map_summary:
            import logging

            logging.getLogger("kdrun").info("cross-tokenizer divergence (vocab=%s): %s", self.vocab, self.map_summary)

    def per_span(self, log_s: Tensor, log_t: Tensor) -> Tensor:
        """The comparison of merged span distributions (rows) by ``vocab``."""
        if self.vocab == "uld":
            return sorted_l1(log_t, log_s)
        ms, mt = log_s.index_select(-1, self.s_ids), log_t.index_select(-1, self.t_ids)
        if self.vocab == "exact_map":
            ns, nt = torch.logsumexp(log_s, -1, keepdim=True), torch.logsumexp(log_t, -1, keepdim=True)
            return divergence(self.kind, _with_tail(ms - ns), _with_tail(mt - nt), self.teacher_mix, self.skew)
        matched = divergence(self.kind, ms - torch.logsumexp(ms, -1, keepdim=True), mt - torch.logsumexp(mt, -1, keepdim=True),
                             self.teacher_mix, self.skew)
        rest = sorted_l1(log_t.index_select(-1, self.t_rest), log_s.index_select(-1, self.s_rest))
        w = self.matched_weight if self.matched_weight is not None else self.adaptive
        u = self.unmatched_weight if self.matched_weight is not None else 1.0 - self.adaptive
        return w * matched + u * rest

    def _chunk_sum(self, student: Tensor, teacher: Tensor, s_target: Tensor, t_target: Tensor, span: Tensor,
                   t_span: Tensor) -> Tensor:
        groups = min(span.shape[1], t_span.shape[1])  # a sequence has at most as many spans as positions on either side
        log_s, s_ok = merge_spans(student, s_target, span, groups, self.merge, self.temperature)
        log_t, t_ok = merge_spans(teacher, t_target, t_span, groups, self.merge, self.temperature)
        return (self.per_span(log_s, log_t) * (s_ok & t_ok)).sum()

    def forward(self, student: Tensor, teacher: Tensor, student_target: Tensor, teacher_target: Tensor,  # type: ignore[override]
                span: Tensor, teacher_span: Tensor, mask: Tensor) -> Tensor:
        teacher = teacher.detach()
        total = student.new_zeros((), dtype=torch.float32)
        for start in range(0, student.shape[0], self.chunk_rows):
            rows = slice(start, start + self.chunk_rows)
            args = (student[rows], teacher[rows], student_target[rows], teacher_target[rows], span[rows], teacher_span[rows])
            if torch.is_grad_enabled() and student.requires_grad:
                total = total + checkpoint(self._chunk_sum, *args, use_reentrant=False)
            else:
                total = total + self._chunk_sum(*args)
        return total / (mask != 0).sum().clamp_min(1).float()

    def extra_repr(self) -> str:
        return f"vocab={self.vocab}, kind={self.kind}, merge={self.merge}, temperature={self.temperature}"


__all__ = ["CrossTokenizerDivergence", "merge_spans", "sorted_l1"]
