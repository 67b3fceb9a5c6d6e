"""Loss terms over token sequences: a value per position, averaged over the valid tokens of a mask.

Every term returns the mean over its micro-batch's valid tokens, ``sum_{b,t} m_bt l_bt / sum_{b,t} m_bt``
(0 when the mask holds no token), and declares ``mean_over = "tokens"`` with its mask argument, so
that under gradient accumulation and data parallelism the engine turns these means into the mean over
every valid token of the optimizer step (:mod:`kdrun.engine.accumulate`) -- not a mean of
micro-batch means, which over-weights short sequences.

Notation: at a position, ``p = softmax(z_t / T)`` is the teacher's next-token distribution, ``q =
softmax(z_s / T)`` the student's, ``KL(a||b) = sum_v a_v (log a_v - log b_v)``.

Memory: the per-position arithmetic runs in float32 over chunks of ``chunk_size`` positions, each under
activation checkpointing, so neither the forward nor the saved state for backward ever holds float32
(batch, length, vocabulary) tensors of both models -- only one chunk's, recomputed in backward. The
models' own logits (in their dtype) are the only full-size tensors.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from kdrun.losses.base import LossTerm
from kdrun.losses.taid import TAIDSchedule, interpolated_cross_entropy
from kdrun.losses.features import to_float

LOG_FLOOR = -1.0e4  # mixtures and tail buckets are clamped here: exp() is 0, and 0 * (a - b) stays finite (empty tails)
DIVERGENCES = ("fkl", "rkl", "jsd", "skl", "srkl", "tvd")


def _masked_mean(per_token: Tensor, mask: Tensor) -> Tensor:
    m = (mask != 0).to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def chunked_masked_sum(fn: Callable[..., Tensor], tensors: Sequence[Tensor], mask: Tensor,
                       chunk_size: int | None) -> Tensor:
    """``sum_i m_i fn(rows_i)`` over the flattened (batch x positions) rows of ``tensors``, computed in
    chunks of ``chunk_size`` rows (None: at once). Each chunk that needs gradients is checkpointed, so the
    float32 intermediates of ``fn`` exist for one chunk at a time, in forward and in backward."""
    n = mask.numel()
    flat = [t.reshape(n, *t.shape[mask.dim():]) for t in tensors]
    m = (mask.reshape(n) != 0).float()

    def part(*args: Tensor) -> Tensor:
        return (fn(*args[:-1]) * args[-1]).sum()

    if chunk_size is None or n <= chunk_size:
        return part(*flat, m)
    total = torch.zeros((), device=mask.device)
    for start in range(0, n, chunk_size):
        rows = [t[start:start + chunk_size] for t in flat] + [m[start:start + chunk_size]]
        if torch.is_grad_enabled() and any(r.requires_grad for r in rows):
            total = total + checkpoint(part, *rows, use_reentrant=False)
        else:
            total = total + part(*rows)
    return total


def _token_mean(fn: Callable[..., Tensor], tensors: Sequence[Tensor], mask: Tensor, chunk_size: int | None) -> Tensor:
    return chunked_masked_sum(fn, tensors, mask, chunk_size) / (mask != 0).sum().clamp_min(1).float()


def log_probs(z: Tensor, temperature: float = 1.0) -> Tensor:
    """``log softmax(z / T)`` in float32 (no division at T = 1). Logits must be finite: a model that masks
    vocabulary rows should give them a large negative finite value, not ``-inf``."""
    z = to_float(z)
    return F.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``KL(a||b) = sum_v a_v (log a_v - log b_v)`` over the last dimension (log-probabilities in)."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


def log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """``log(w a + (1 - w) b)`` for ``0 < w < 1``, by log-sum-exp."""
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a)).clamp_min(LOG_FLOOR)


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``, stable at both ends (Maechler 2012)."""
    x = x.clamp_max(-1e-7)
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def top_k_with_tail(log_s: Tensor, log_t: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Both distributions restricted to the teacher's ``k`` most likely tokens plus one tail bucket
    holding the rest of each model's mass: (..., k + 1) log-probabilities that each sum to 1 (the "tail
    bucket" support of TRL's server distillation and DistillKit's ``symmetric_uniform``)."""
    top_t, idx = log_t.topk(k, dim=-1)
    top_s = log_s.gather(-1, idx)
    tail_t = _log1mexp(torch.logsumexp(top_t, dim=-1, keepdim=True))
    tail_s = _log1mexp(torch.logsumexp(top_s, dim=-1, keepdim=True))
    return (torch.cat([top_s, tail_s], dim=-1).clamp_min(LOG_FLOOR),
            torch.cat([top_t, tail_t], dim=-1).clamp_min(LOG_FLOOR))


def divergence(kind: str, log_s: Tensor, log_t: Tensor, teacher_mix: float = 0.5, skew: float = 0.1,
               stop_grad_mixture: bool = False) -> Tensor:
    """Per-position divergence between student ``q`` and teacher ``p`` (log-probabilities in, last dim summed).

    - ``fkl``: ``KL(p||q)`` (forward KL; word-level KD, Hinton et al. 2015 / Kim & Rush 2016).
    - ``rkl``: ``KL(q||p)`` (reverse KL; MiniLLM, Gu et al. ICLR 2024).
    - ``jsd``: generalized Jensen-Shannon of GKD (Agarwal et al. ICLR 2024) with ``pi = teacher_mix``, the
      teacher's weight in the mixture ``m = pi p + (1 - pi) q``: ``pi KL(p||m) + (1 - pi) KL(q||m)``;
      ``pi = 0`` is taken as ``fkl`` and ``pi = 1`` as ``rkl`` (the limits of the scaled divergence, as TRL
      does). TRL's ``beta`` is ``pi``; DistiLLM's ``lambda`` is ``1 - pi`` (its default 0.9 is ``pi = 0.1``).
    - ``skl``: skew KL ``KL(p || a p + (1 - a) q)`` with ``a = skew`` (DistiLLM, Ko et al. ICML 2024; 0.1).
    - ``srkl``: skew reverse KL ``KL(q || a q + (1 - a) p)``; ``stop_grad_mixture`` detaches the ``q`` inside
      the mixture (DistiLLM-2, Ko et al. ICML 2025).
    - ``tvd``: total variation ``1/2 sum_v |p_v - q_v|``.
    """
    if kind == "fkl" or (kind == "jsd" and teacher_mix == 0.0):
        return kl(log_t, log_s)
    if kind == "rkl" or (kind == "jsd" and teacher_mix == 1.0):
        return kl(log_s, log_t)
    if kind == "jsd":
        log_m = log_mix(log_t, log_s, teacher_mix)
        return teacher_mix * kl(log_t, log_m) + (1.0 - teacher_mix) * kl(log_s, log_m)
    if kind == "skl":
        return kl(log_t, log_mix(log_t, log_s, skew)) if skew > 0 else kl(log_t, log_s)
    if kind == "srkl":
        inner = log_s.detach() if stop_grad_mixture else log_s
        return kl(log_s, log_mix(inner, log_t, skew)) if skew > 0 else kl(log_s, log_t)
    if kind == "tvd":
        return 0.5 * (log_t.exp() - log_s.exp()).abs().sum(dim=-1)
    raise ValueError(f"unknown divergence '{kind}'; choose one of {', '.join(DIVERGENCES)}")


def _check(term: str, logits: torch.Size, mask: torch.Size, other: tuple[str, torch.Size] | None = None) -> None:
    if len(logits) != 3:
        raise ValueError(f"{term}: logits must be (batch, positions, vocabulary), got {tuple(logits)}")
    if tuple(mask) != tuple(logits[:2]):
        raise ValueError(f"{term}: 'mask' {tuple(mask)} must be (batch, positions) = {tuple(logits[:2])}")
    if other is None:
        return
    name, shape = other
    if len(shape) == 3 and tuple(shape[:2]) == tuple(logits[:2]) and shape[2] != logits[2]:
        raise ValueError(
            f"{term}: the student's vocabulary has {logits[2]} entries and the {name}'s {shape[2]}: a token-level "
            f"divergence needs teacher and student to share one tokenizer and vocabulary (use a teacher of the "
            f"student's family, or sequence-level KD on teacher text)")
    if tuple(shape) != tuple(logits):
        raise ValueError(f"{term}: '{name}' {tuple(shape)} must have the shape of the logits {tuple(logits)}")


def _check_chunk(chunk_size: int | None) -> int | None:
    if chunk_size is not None and int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive number of positions or null (no chunks), got {chunk_size}")
    return None if chunk_size is None else int(chunk_size)


class TokenCrossEntropy(LossTerm):
    """Next-token cross-entropy averaged over valid tokens:
    ``sum_{b,t} m_bt * (-log softmax(z_bt)[y_bt]) / sum_{b,t} m_bt``.

    Inputs: ``logits`` (B, T, V), ``target`` (B, T) token ids (the next token of each position; -100 where
    none), ``mask`` (B, T), non-zero where the position counts (a batch field, e.g. ``batch.token_mask``:
    response tokens only, no padding). Args: ``chunk_size`` positions per float32 chunk (default 1024)."""

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, chunk_size: int | None = 1024) -> None:
        super().__init__()
        self.chunk_size = _check_chunk(chunk_size)

    def check_shapes(self, logits: torch.Size, target: torch.Size, mask: torch.Size) -> None:  # type: ignore[override]
        _check("token cross-entropy", logits, mask)
        if tuple(target) != tuple(logits[:2]):
            raise ValueError(f"token cross-entropy: 'target' {tuple(target)} must be (batch, positions) = {tuple(logits[:2])}")

    def forward(self, logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        def per_token(z: Tensor, y: Tensor) -> Tensor:
            return F.cross_entropy(to_float(z), y.clamp_min(0), reduction="none")

        return _token_mean(per_token, [logits, target], mask, self.chunk_size)


class TokenDivergence(LossTerm):
    """A token-level divergence between teacher and student next-token distributions, averaged over the
    valid tokens of ``mask``: ``s * sum_{b,t} m_bt D(p_bt, q_bt) / sum_{b,t} m_bt`` with
    ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)`` and ``s = T^2`` if ``t_squared`` else 1.

    ``kind`` picks ``D`` (see :func:`divergence`): ``fkl`` (default), ``rkl``, ``jsd`` (``teacher_mix``,
    default 0.5), ``skl`` / ``srkl`` (``skew``, default 0.1; ``stop_grad_mixture`` for srkl), ``tvd``.

    ``top_k``: restrict both distributions to the teacher's ``k`` most likely tokens plus a tail bucket
    with each model's remaining mass (:func:`top_k_with_tail`; null: the whole vocabulary).

    Defaults follow LLM practice: T = 1 and no T^2 (MiniLLM, DistiLLM, TRL). ``chunk_size``: positions per
    float32 chunk (default 1024; null computes all at once).

    Inputs: ``student``, ``teacher`` (B, T, V) logits over one vocabulary (the same tokenizer: a
    different vocabulary size is refused at build time), ``mask`` (B, T) a batch field.
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, kind: str = "fkl", temperature: float = 1.0, teacher_mix: float = 0.5, skew: float = 0.1,
                 stop_grad_mixture: bool = False, top_k: int | None = None, t_squared: bool = False,
                 chunk_size: int | None = 1024) -> None:
        super().__init__()
        if kind not in DIVERGENCES:
            raise ValueError(f"token divergence: unknown kind '{kind}'; choose one of {', '.join(DIVERGENCES)}")
        if temperature <= 0:
            raise ValueError(f"token divergence: temperature must be positive, got {temperature}")
        if not 0.0 <= teacher_mix <= 1.0:
            raise ValueError(f"token divergence: teacher_mix must be in [0, 1], got {teacher_mix}")
        if not 0.0 <= skew < 1.0:
            raise ValueError(f"token divergence: skew must be in [0, 1), got {skew}")
        if top_k is not None and int(top_k) < 1:
            raise ValueError(f"token divergence: top_k must be a positive number of tokens or null, got {top_k}")
        self.kind, self.temperature = kind, float(temperature)
        self.teacher_mix, self.skew, self.stop_grad_mixture = float(teacher_mix), float(skew), bool(stop_grad_mixture)
        self.top_k = None if top_k is None else int(top_k)
        self.scale = self.temperature ** 2 if t_squared else 1.0
        self.chunk_size = _check_chunk(chunk_size)

    def check_shapes(self, student: torch.Size, teacher: torch.Size, mask: torch.Size) -> None:  # type: ignore[override]
        _check(f"token divergence ({self.kind})", student, mask, ("teacher", teacher))
        if self.top_k is not None and self.top_k > student[2]:
            raise ValueError(f"token divergence: top_k {self.top_k} exceeds the vocabulary ({student[2]})")

    def per_token(self, student: Tensor, teacher: Tensor) -> Tensor:
        """``D(p, q)`` for rows of logits (..., V) -> (...)."""
        log_s, log_t = log_probs(student, self.temperature), log_probs(teacher.detach(), self.temperature)
        if self.top_k is not None:
            log_s, log_t = top_k_with_tail(log_s, log_t, self.top_k)
        return divergence(self.kind, log_s, log_t, self.teacher_mix, self.skew, self.stop_grad_mixture)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return self.scale * _token_mean(self.per_token, [student, teacher], mask, self.chunk_size)


class CachedTokenDivergence(TokenDivergence):
    """:class:`TokenDivergence` against a teacher cached on disk (``data.teacher_cache``, written by
    ``kdrun-cache``): the teacher's top-K next tokens ``ids`` with their log-probabilities ``logp`` and the
    log of the rest of its mass ``tail`` at each scored position, read from the cache with no teacher forward.

    The student's distribution is restricted to the same support, ``log q`` at ``ids`` plus its own tail
    ``log(1 - sum_k q_k)``, and ``D`` of that (K + 1)-bucket pair is averaged over the valid tokens: the
    value of ``TokenDivergence(top_k=K)`` on the live teacher (equal to rounding with a float32 cache; at
    K = V the full-vocabulary divergence). Temperature 1 only: the cache holds temperature-1 log-probabilities,
    and its tail bucket has no tempered form.

    ``support: top_k`` drops the tail: both distributions renormalised over the K cached tokens, the teacher's
    tempered by ``teacher_temperature`` first, ``p~ = softmax(logp / tau)`` over K. This is FIRST (Shum et al.,
    EMNLP 2024): a top-5 cache, re-calibrated by a temperature fitted on held-out data to minimise the teacher's
    ECE (``kdrun-cache --calibrate``; ``teacher_temperature: calibrated`` reads it from the manifest of ``cache``,
    the cache directory). Whether FIRST renormalises the student over the same K tokens is not stated in what was
    read; kdrun does, so that both sides of the divergence are distributions.

    Inputs: ``student`` (B, T, V) logits, ``ids`` (B, T, K) ``batch.cache_ids``, ``logp`` (B, T, K)
    ``batch.cache_logp``, ``tail`` (B, T) ``batch.cache_tail``, ``mask`` (B, T). Args: ``kind`` and its
    parameters as :class:`TokenDivergence`; ``chunk_size``; ``support`` (``tail``: default, or ``top_k``);
    ``teacher_temperature`` (1.0, a number or ``calibrated``; ``top_k`` support only); ``cache``.
    """

    def __init__(self, kind: str = "fkl", teacher_mix: float = 0.5, skew: float = 0.1, stop_grad_mixture: bool = False,
                 t_squared: bool = False, chunk_size: int | None = 1024, temperature: float = 1.0, support: str = "tail",
                 teacher_temperature: float | str = 1.0, cache: str | None = None) -> None:
        if temperature != 1.0:
            raise ValueError(f"cached token divergence: the cache holds temperature-1 log-probabilities; temperature must "
                             f"be 1, got {temperature}")
        super().__init__(kind=kind, temperature=1.0, teacher_mix=teacher_mix, skew=skew,
                         stop_grad_mixture=stop_grad_mixture, t_squared=t_squared, chunk_size=chunk_size)
        if support not in ("tail", "top_k"):
            raise ValueError(f"cached token divergence: support must be tail or top_k, got '{support}'")
        self.support = support
        self.teacher_temperature = self._teacher_temperature(teacher_temperature, cache)
        if support == "tail" and self.teacher_temperature != 1.0:
            raise ValueError("cached token divergence: a tempered teacher needs support=top_k (the tail bucket has no "
                             "tempered form)")

    @staticmethod
    def _teacher_temperature(value: float | str, cache: str | None) -> float:
        if value != "calibrated":
            if float(value) <= 0:
                raise ValueError(f"cached token divergence: teacher_temperature must be > 0, got {value}")
            return float(value)
        import json
        from pathlib import Path

        manifest = Path(str(cache)) / "manifest.json" if cache else None
        if manifest is None or not manifest.is_file():
            raise ValueError(f"cached token divergence: teacher_temperature=calibrated reads the temperature from the "
                             f"cache's manifest: set cache=${{data.teacher_cache}} (got {cache!r})")
        cal = json.loads(manifest.read_text()).get("calibration")
        if not cal:
            raise ValueError(f"cached token divergence: {manifest} holds no calibration; write the cache with "
                             f"kdrun-cache --calibrate")
        return float(cal["temperature"])

    def check_shapes(self, student: torch.Size, ids: torch.Size, logp: torch.Size, tail: torch.Size,  # type: ignore[override]
                     mask: torch.Size) -> None:
        _check(f"cached token divergence ({self.kind})", student, mask)
        if tuple(ids) != tuple(logp) or tuple(ids[:2]) != tuple(student[:2]) or tuple(tail) != tuple(student[:2]):
            raise ValueError(f"cached token divergence: ids {tuple(ids)} and logp {tuple(logp)} must be (batch, positions, "
                             f"K) and tail {tuple(tail)} (batch, positions) for logits {tuple(student)}; read them from "
                             f"batch.cache_ids, batch.cache_logp, batch.cache_tail (data.teacher_cache)")

    def per_cached_token(self, student: Tensor, ids: Tensor, logp: Tensor, tail: Tensor) -> Tensor:
        """``D`` over the K + 1 buckets for rows of logits (..., V) and cached rows (..., K), (...)."""
        log_s = log_probs(student, 1.0)
        top_s = log_s.gather(-1, ids.long())
        if self.support == "top_k":
            t = to_float(logp) / self.teacher_temperature
            return divergence(self.kind, (top_s - torch.logsumexp(top_s, -1, keepdim=True)).clamp_min(LOG_FLOOR),
                              (t - torch.logsumexp(t, -1, keepdim=True)).clamp_min(LOG_FLOOR), self.teacher_mix, self.skew,
                              self.stop_grad_mixture)
        tail_s = _log1mexp(torch.logsumexp(top_s, dim=-1, keepdim=True))
        log_s = torch.cat([top_s, tail_s], dim=-1).clamp_min(LOG_FLOOR)
        log_t = torch.cat([to_float(logp), to_float(tail).unsqueeze(-1)], dim=-1).clamp_min(LOG_FLOOR)
        return divergence(self.kind, log_s, log_t, self.teacher_mix, self.skew, self.stop_grad_mixture)

    def forward(self, student: Tensor, ids: Tensor, logp: Tensor, tail: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return self.scale * _token_mean(self.per_cached_token, [student, ids, logp, tail], mask, self.chunk_size)


class SampledTokenKL(LossTerm):
    """The reverse KL ``KL(q || p)`` of student ``q`` to teacher ``p``, estimated at the sampled tokens ``y_t``
    (on the student's own rollouts: :class:`kdrun.data.rollout.Rollout`), averaged over the valid tokens.
    With ``r_t = log q(y_t) - log p(y_t)`` (Schulman's estimators, as KDRL, Xu et al. arXiv 2506.02208, uses them):

    - ``k1 = r`` (unbiased for KL(q || p) when ``y ~ q``; its gradient through ``log q`` has mean zero on-policy);
    - ``k2 = r^2 / 2`` (KDRL's preferred; biased, low variance; its gradient is that of the reverse KL on-policy);
    - ``k3 = exp(-r) - 1 + r`` (unbiased and non-negative when ``y ~ q``).

    The teacher carries no gradient. The estimates are valid for tokens sampled from the current student; on
    fixed data they need importance weights (not applied). Inputs: ``student``, ``teacher`` (B, T, V) logits,
    ``target`` (B, T) the sampled next tokens (``batch.labels``), ``mask`` (B, T). Args: estimator (``k2``).
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, estimator: str = "k2") -> None:
        super().__init__()
        if estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"sampled-token KL: estimator must be k1, k2 or k3, got '{estimator}'")
        self.estimator = estimator

    def check_shapes(self, student: torch.Size, teacher: torch.Size, target: torch.Size, mask: torch.Size) -> None:  # type: ignore[override]
        _check(f"sampled-token KL ({self.estimator})", student, mask, ("teacher", teacher))
        if tuple(target) != tuple(mask):
            raise ValueError(f"sampled-token KL: 'target' {tuple(target)} must be (batch, positions) = {tuple(mask)}")

    def per_token(self, student: Tensor, teacher: Tensor, target: Tensor) -> Tensor:
        y = target.long().clamp_min(0).unsqueeze(-1)
        r = (log_probs(student).gather(-1, y) - log_probs(teacher.detach()).gather(-1, y)).squeeze(-1)
        if self.estimator == "k1":
            return r
        if self.estimator == "k2":
            return 0.5 * r * r
        return torch.expm1(-r) + r

    def forward(self, student: Tensor, teacher: Tensor, target: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        return _token_mean(self.per_token, [student, teacher, target], mask, None)


class TokenKLLoss(TokenDivergence):
    """Forward KL between the teacher's and the student's next-token distributions at temperature T,
    averaged over valid tokens and scaled by T^2 (Hinton et al. 2015, per position):

    ``T^2 * sum_{b,t} m_bt KL(softmax(z^t_bt / T) || softmax(z^s_bt / T)) / sum_{b,t} m_bt``.

    :class:`TokenDivergence` with ``kind=fkl, t_squared=true`` and no chunks. Inputs: ``student``,
    ``teacher`` (B, T, V) logits over the same vocabulary, ``mask`` (B, T) a batch field. Args:
    temperature (default 1.0)."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__(kind="fkl", temperature=temperature, t_squared=True, chunk_size=None)


class TAIDLoss(TAIDSchedule):
    """TAID: temporally adaptive interpolated distillation (Shing et al., "TAID: Temporally Adaptive
    Interpolated Distillation for Efficient Knowledge Transfer in Language Models", ICLR 2025), per token.

    Target ``p_t = softmax((1 - t) sg(z_s) + t z_t)``, loss ``-sum_v p_t(v) log q(v)`` averaged over the
    valid tokens; ``t`` follows :class:`kdrun.losses.taid.TAIDSchedule` (the step's ``l`` is its mean over
    every valid token of the step's micro-batches and ranks). For class logits (B, C) use
    :class:`kdrun.losses.TAIDClassifierLoss`.

    Inputs: ``student``, ``teacher`` (B, T, V) logits, ``mask`` (B, T).
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, t_start: float = 0.4, t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                 adaptive: bool = True, chunk_size: int | None = 1024) -> None:
        super().__init__(t_start, t_end, alpha, beta, adaptive)
        self.chunk_size = _check_chunk(chunk_size)

    def check_shapes(self, student: torch.Size, teacher: torch.Size, mask: torch.Size) -> None:  # type: ignore[override]
        _check("TAID", student, mask, ("teacher", teacher))

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:  # type: ignore[override]
        t = self.t

        def per_token(zs: Tensor, zt: Tensor) -> Tensor:
            return interpolated_cross_entropy(zs, zt, t)

        loss = _token_mean(per_token, [student, teacher], mask, self.chunk_size)
        self.record_loss(loss, (mask != 0).sum())
        return loss


class TokenHiddenLoss(LossTerm):
    """Hidden-state distillation per token, averaged over valid tokens and over the (student, teacher)
    pairs of a layer map: ``(1/K) sum_k sum_{b,t} m_bt d(h^s_k,bt, h^t_k,bt) / sum_{b,t} m_bt``.

    ``kind``: ``mse`` -- ``d = mean_j (h^s_j - h^t_j)^2`` (DistillKit, TextBrewer's hidden MSE);
    ``cosine`` -- ``d = 1 - cos(h^s, h^t)`` (DistilBERT's cosine embedding loss, Sanh et al. 2019).
    Inputs: ``student``, ``teacher`` -- one (B, T, D) tensor each or equally long lists (the layer map,
    e.g. ``[student.hidden.1, student.hidden.3]`` against ``[teacher.hidden.3, teacher.hidden.7]``), with
    equal widths (a projection adapter maps a narrower student: ``kdrun.models.adapters.Projector``);
    ``mask`` (B, T).
    """

    mean_over = "tokens"
    count_input = "mask"

    def __init__(self, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"token hidden loss: kind must be 'mse' or 'cosine', got '{kind}'")
        self.kind = kind

    @staticmethod
    def _pairs(student, teacher) -> tuple[list, list]:
        s = list(student) if isinstance(student, (list, tuple)) else [student]
        t = list(teacher) if isinstance(teacher, (list, tuple)) else [teacher]
        return s, t

    def check_shapes(self, student, teacher, mask: torch.Size) -> None:  # type: ignore[override]
        s_list, t_list = self._pairs(student, teacher)
        if len(s_list) != len(t_list):
            raise ValueError(f"token hidden loss: {len(s_list)} student and {len(t_list)} teacher layers; the layer map pairs them one to one")
        for i, (s, t) in enumerate(zip(s_list, t_list)):
            if len(s) != 3 or tuple(s[:2]) != tuple(mask):
                raise ValueError(f"token hidden loss: pair {i}: student hidden {tuple(s)} must be (batch, positions, width) with mask {tuple(mask)}")
            if tuple(s) != tuple(t):
                raise ValueError(f"token hidden loss: pair {i}: student {tuple(s)} and teacher {tuple(t)} differ; "
                                 f"add a projection adapter (kdrun.models.adapters.Projector) on the student side")

    def forward(self, student, teacher, mask: Tensor) -> Tensor:  # type: ignore[override]
        s_list, t_list = self._pairs(student, teacher)
        total = torch.zeros((), device=mask.device)
        for s, t in zip(s_list, t_list):
            s, t = to_float(s), to_float(t.detach())
            d = (s - t).pow(2).mean(dim=-1) if self.kind == "mse" else 1 - F.cosine_similarity(s, t, dim=-1)
            total = total + _masked_mean(d, mask)
        return total / len(s_list)


__all__ = ["TAIDLoss", "TokenCrossEntropy", "TokenDivergence", "TokenHiddenLoss", "TokenKLLoss", "chunked_masked_sum",
           "divergence", "kl", "log_probs", "top_k_with_tail"]
