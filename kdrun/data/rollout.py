"""On-policy and mixed data: completions sampled from a model for the batch's prompts, before the forward.

``Rollout`` is a batch transform (``batch_transform:`` of the run or of a stage) for prompt/response data
(:func:`kdrun.data.text.instructions`: ``input_ids``, ``attention_mask``, ``labels``, ``token_mask``,
``prompt_length``). With probability ``on_policy_prob`` (per micro-batch) it replaces every example's
response by a completion that ``source`` (the student by default) samples for its prompt, and rebuilds
the batch so that the models and the loss terms score the sampled tokens (the closing EOS included):

- ``on_policy_prob = 1``: on-policy distillation (MiniLLM's and GKD's student rollouts, Gu et al. ICLR
  2024; Agarwal et al. ICLR 2024);
- ``0 < on_policy_prob < 1``: GKD's mixture, lambda = ``on_policy_prob``, of student-generated and fixed
  data;
- ``source: teacher``: sequence-level KD (Kim & Rush, EMNLP 2016) on the teacher's samples.

Sampling: Hugging Face ``generate`` on left-padded prompts, in eval mode without autograd (dropout off,
as TRL's ``disable_dropout``), ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``. The mixing decision
is seeded from (run seed, round, stage, step, micro-batch), the same on every rank, so all ranks of a
step are on-policy or all are not; the sampling key adds the rank, so each rank draws its own samples.
A resumed run draws the same rollouts as an uninterrupted one, and the global generators are left as
they were. Evaluation batches keep the data's responses.

``generate_per`` chooses how often ``generate`` runs under gradient accumulation:

- ``micro_batch`` (default): every micro-batch decides and generates for its own prompts (TRL's GKD
  trainer samples per micro-batch);
- ``step``: one decision and one ``generate`` call over the prompts of all micro-batches of the optimizer
  step (concatenated, left-padded to one width), whose completions are split back and rebuilt per
  micro-batch; the accumulation loop then runs no further transform. With one micro-batch per step the
  two modes draw the same tokens.

Sharded students (FSDP2): before sampling, every ``FSDPModule`` of the model is unsharded and kept
unsharded for the whole ``generate`` call (``gather_sharded: true``, default: one all-gather per unit, full
parameters in memory while sampling, resharded afterwards); with ``gather_sharded: false`` the units stay
sharded and ``generate(synced_gpus=True)`` keeps the ranks' forwards in step until the longest rank is
done (less memory, one all-gather per unit per token).

Generation reads host values (prompt lengths, completion lengths) and ``generate`` itself synchronises
at every token; a rollout step is therefore not free of device synchronisation. :class:`AdaptiveReplay` is
DistiLLM's adaptive off-policy schedule (a replay buffer of student generations).

Data whose teacher tokenises the text itself (``data.source.alignment`` spans or positions): the completions
are decoded and tokenised again by each model's tokenizer, and every field of both models is rebuilt with
the data source's alignment (:mod:`kdrun.data.retokenise`); ``source: teacher`` is then sequence-level KD
across tokenizers, ``source: student`` GOLD's on-policy setting. Not built: a faster backend (vLLM) behind
the same interface.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Mapping

import torch
from torch import Tensor

from kdrun.component import BuildContext, Component, StageInfo
from kdrun.data.mix import BatchTransform
from kdrun.engine.distributed import all_gather_object, launched_info
from kdrun.engine.fsdp import fsdp_units, gathered
from kdrun.errors import KdrunError

IGNORE_INDEX = -100


def rebuild(batch: Mapping[str, Tensor], prompts: Tensor, prompt_len: Tensor, completions: Tensor, eos_id: int | None,
            pad_id: int, lengths: Tensor | None = None) -> dict[str, Tensor]:
    """The batch with each example's response replaced by its completion.

    ``prompts`` (B, P) left-padded prompt tokens (example i's prompt is its last ``prompt_len[i]``);
    ``completions`` (B, M): what ``generate`` appended (padded after the first EOS). Example i becomes
    ``prompt + completion[:c_i]``, ``c_i`` up to and including the first EOS (all M without one; or ``lengths``
    when given), right-padded; ``labels`` are the next tokens at the completion's positions (``-100`` elsewhere),
    ``token_mask`` marks them; every other field is kept.
    """
    b, p = prompts.shape
    m = completions.shape[1]
    dev = prompts.device
    if lengths is not None:
        clen = lengths.to(dev)
    elif eos_id is not None:
        is_eos = completions == eos_id
        first = torch.where(is_eos.any(dim=1), is_eos.float().argmax(dim=1), torch.full((b,), m, device=dev))
        clen = torch.where(is_eos.any(dim=1), first + 1, first)
    else:
        clen = torch.full((b,), m, device=dev)
    full = torch.cat([prompts, completions], dim=1)  # (B, P + M): pads | prompt | completion | after
    shift = (p - prompt_len).view(-1, 1)
    cols = torch.arange(p + m, device=dev).view(1, -1) + shift  # right-align: prompt starts at column 0
    total = (prompt_len + clen).view(-1, 1)
    valid = torch.arange(p + m, device=dev).view(1, -1) < total
    seq = torch.where(valid, full.gather(1, cols.clamp_max(p + m - 1)), torch.full_like(full, pad_id))
    width = int(total.max()) - 1  # inputs predict the next token: the last token is only a target
    x, y = seq[:, :width], seq[:, 1:width + 1]
    pos = torch.arange(width, device=dev).view(1, -1)
    scored = (pos >= (prompt_len - 1).view(-1, 1)) & (pos < (total - 1))
    out = {k: v for k, v in batch.items()}
    inside = pos < (total - 1)
    out["input_ids"] = torch.where(inside, x, torch.full_like(x, pad_id))
    out["attention_mask"] = inside.long()
    out["labels"] = torch.where(scored, y, torch.full_like(y, IGNORE_INDEX))
    out["token_mask"] = scored
    return out


def at_prediction_positions(values: Tensor, prompt_len: Tensor, width: int, fill: float | int) -> Tensor:
    """(B, width) ``values`` (B, M) of the completion's tokens at the positions that predict them: position ``t``
    predicts token ``t + 1``, so completion token ``j`` (after a prompt of ``prompt_len`` tokens) sits at
    ``prompt_len - 1 + j``; ``fill`` elsewhere."""
    j = torch.arange(width, device=values.device).view(1, -1) - (prompt_len - 1).view(-1, 1)
    inside = (j >= 0) & (j < values.shape[1])
    got = values.gather(1, j.clamp(0, max(values.shape[1] - 1, 0)))
    return torch.where(inside, got, torch.full_like(got, fill))


def _cache_argument(model: Any) -> str:
    """The forward argument that takes a key/value cache: ``cache`` in recent transformers, ``past_key_values``
    before (and in models that have not moved)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _mix(parts: tuple[int, ...]) -> int:
    """One seed from a tuple of integers (the same in every process)."""
    key = 0
    for v in parts:
        key = (key * 1_000_003 + int(v)) % (2**63 - 1)
    return key


def scored_tokens(labels: Tensor, token_mask: Tensor, start: Tensor) -> tuple[Tensor, Tensor]:
    """The scored tokens of each row, left-aligned: (B, W) ids and a boolean mask, for rows whose scored positions
    are one contiguous run starting at ``start`` (B,) (a response after its prompt)."""
    width = labels.shape[1]
    cols = torch.arange(width, device=labels.device).view(1, -1) + start.view(-1, 1)
    inside = cols < width
    ids = labels.gather(1, cols.clamp_max(width - 1))
    mask = token_mask.gather(1, cols.clamp_max(width - 1)) & inside
    return torch.where(mask, ids, torch.zeros_like(ids)), mask


def _left_padded(ids: Tensor, prompt_len: Tensor, width: int, pad_id: int) -> Tensor:
    """(B, width) prompts: example i's first ``prompt_len[i]`` tokens of ``ids``, left-padded with ``pad_id``."""
    cols = torch.arange(width, device=ids.device).view(1, -1) - (width - prompt_len).view(-1, 1)
    return torch.where(cols >= 0, ids.gather(1, cols.clamp(0, ids.shape[1] - 1)), torch.full_like(cols, pad_id))


def _resolve(reward: Any) -> Any:
    if reward is None or callable(reward):
        return reward
    from hydra.utils import get_method

    try:
        return get_method(str(reward))
    except Exception:  # noqa: BLE001 - any failure to import it is the same user error
        raise KdrunError(f"batch_transform.reward: cannot import '{reward}'; give a dotted path to a function, e.g. "
                         f"kdrun.rewards.final_number_match") from None


class Rollout(BatchTransform, Component):
    """Completions sampled from ``source`` replace the responses of a micro-batch with probability
    ``on_policy_prob`` (see the module docstring).

    Args:
        source: the model that samples (``student``, default; ``teacher`` for sequence-level KD).
        on_policy_prob: lambda, the probability that a micro-batch (or a step, below) is generated (1.0).
        max_new_tokens: the completion budget (64). temperature (1.0), top_k (0: off), top_p (1.0): sampling.
        eos_token_id, pad_token_id: default the data tokenizer's (read at build).
        samples_per_prompt: G completions of every prompt, adjacent rows numbered by ``group`` (1; GRPO: > 1).
        reward: a dotted path to ``f(completion, mask, reference, reference_mask, tokenizer) -> (B,)`` (none).
        generate_per: ``micro_batch`` (default: one ``generate`` per micro-batch, TRL's GKD) or ``step``: one
            batched ``generate`` for the prompts of all the optimizer step's micro-batches (one draw of lambda
            per step), whose completions are split back into the micro-batches (TRL's GRPO generation batch).
            The same rollouts either way when a step has one micro-batch.
        gather_sharded: under FSDP, gather the sharded source's full weights once per generation (default; the
            whole model on every rank meanwhile, as TRL's ``ds3_gather_for_generation``) or, false, keep them
            sharded and let every rank run forwards until all ranks are done (HF's ``synced_gpus``: one
            all-gather per layer per token, memory of one layer).
        teacher_mix: MiniLLM's teacher-mixed sampling, alpha (0: off; the authors' scripts use 0.2): each token is
            drawn from ``(1 - alpha) q + alpha p``, student ``q`` and teacher ``p`` at temperature ``temperature``,
            by kdrun's own sampling loop (both models' key/value caches), and the batch gets ``mix_weight``,
            ``w_t = q(y_t) / ((1 - alpha) q(y_t) + alpha p(y_t))`` at the positions that predict the sampled
            tokens (1 elsewhere), for :class:`kdrun.losses.MiniLLMLoss` ``weight``. Needs ``source: student``,
            ``on_policy_prob: 1``, no top-k / top-p, and a teacher of the student's vocabulary.
    """

    shard_safe = True  # runs under FSDP: generation gathers the sharded source or keeps the ranks in step

    def __init__(self, source: str = "student", on_policy_prob: float = 1.0, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, samples_per_prompt: int = 1, reward: Any = None,
                 generate_per: str = "micro_batch", gather_sharded: bool = True, teacher_mix: float = 0.0) -> None:
        Component.__init__(self)
        if not 0.0 <= teacher_mix < 1.0:
            raise ValueError(f"rollout: teacher_mix must be in [0, 1), got {teacher_mix}")
        if teacher_mix > 0 and (source != "student" or on_policy_prob != 1.0 or top_k != 0 or top_p != 1.0):
            raise ValueError(f"rollout: teacher_mix (MiniLLM's teacher-mixed sampling) needs source=student, "
                             f"on_policy_prob=1, top_k=0 and top_p=1; got {source}, {on_policy_prob}, {top_k}, {top_p}")
        self.teacher_mix = float(teacher_mix)
        object.__setattr__(self, "_mixer", None)  # the teacher whose distribution is mixed in
        if generate_per not in ("micro_batch", "step"):
            raise ValueError(f"rollout: generate_per must be micro_batch or step, got '{generate_per}'")
        self.generate_per, self.gather_sharded = str(generate_per), bool(gather_sharded)
        if int(samples_per_prompt) < 1 or (int(samples_per_prompt) > 1 and on_policy_prob != 1.0):
            raise ValueError(f"rollout: samples_per_prompt must be >= 1, and a group of samples per prompt needs "
                             f"on_policy_prob=1; got {samples_per_prompt}, {on_policy_prob}")
        self.samples_per_prompt = int(samples_per_prompt)
        object.__setattr__(self, "_reward", _resolve(reward))
        object.__setattr__(self, "_tokenizer", None)
        object.__setattr__(self, "_teacher_tokenizer", None)  # a teacher with its own tokenizer (kdrun.data.retokenise)
        self.alignment = "identical"
        if not 0.0 <= on_policy_prob <= 1.0 or int(max_new_tokens) < 1 or temperature <= 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"rollout: need on_policy_prob in [0, 1], max_new_tokens >= 1, temperature > 0 and top_p in "
                             f"(0, 1]; got {on_policy_prob}, {max_new_tokens}, {temperature}, {top_p}")
        self.source, self.on_policy_prob = str(source), float(on_policy_prob)
        self.max_new_tokens, self.temperature, self.top_k, self.top_p = int(max_new_tokens), float(temperature), int(top_k), float(top_p)
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.seed, self.stage, self.round, self.step, self.micro, self.rank = 0, 0, 0, 0, 0, 0
        self.generated = 0  # micro-batches generated so far (logged by tests and benchmarks)
        object.__setattr__(self, "_model", None)  # the source model, not a submodule (never saved with the transform)

    def bind(self, ctx: BuildContext, tokenizer: Any = None) -> None:
        """The source model and the token ids of EOS and padding (the builder calls this once)."""
        if self.source not in ctx.models:
            raise KdrunError(f"batch_transform (Rollout): no model '{self.source}' to sample from; this run builds "
                             f"{', '.join(ctx.models)} (set source=student or teacher)")
        model = ctx.models[self.source]
        if not hasattr(model, "generate"):
            raise KdrunError(f"batch_transform (Rollout): {self.source} ({type(model).__name__}) has no generate(); "
                             f"rollouts need a Hugging Face causal LM")
        object.__setattr__(self, "_model", model)
        if self.teacher_mix > 0:
            if "teacher" not in ctx.models or not hasattr(ctx.models["teacher"], "forward"):
                raise KdrunError(f"batch_transform.teacher_mix: the teacher's distribution is mixed into the sampling, "
                                 f"but this run builds {', '.join(ctx.models)} and no teacher")
            if ctx.teacher_tokenizer is not None and ctx.alignment != "identical":
                raise KdrunError("batch_transform.teacher_mix: mixing two distributions token by token needs one "
                                 "vocabulary; this teacher tokenises the text itself (data.source.alignment)")
            object.__setattr__(self, "_mixer", ctx.models["teacher"])
        object.__setattr__(self, "_tokenizer", tokenizer)
        object.__setattr__(self, "_teacher_tokenizer", ctx.teacher_tokenizer)
        self.alignment = str(ctx.alignment)
        if self.cross and tokenizer is None:
            raise KdrunError(f"batch_transform ({type(self).__name__}): the teacher tokenises the text itself, so the "
                             f"completions are re-tokenised for each model, which needs the student's tokenizer "
                             f"(data.source.tokenizer)")
        sampler = self._sampler_tokenizer
        if sampler is not None:
            if self.eos_token_id is None:
                self.eos_token_id = sampler.eos_token_id
            if self.pad_token_id is None:
                self.pad_token_id = sampler.pad_token_id if sampler.pad_token_id is not None else sampler.eos_token_id
        if self.pad_token_id is None:
            raise KdrunError("batch_transform (Rollout): no pad token id (the data has no tokenizer); set pad_token_id")
        self.seed = int(ctx.seed)

    @property
    def cross(self) -> bool:
        """True when the teacher has its own tokenisation of the text: completions are re-tokenised for both."""
        return self._teacher_tokenizer is not None and self.alignment != "identical"

    @property
    def _sampler_tokenizer(self) -> Any:
        """The tokenizer of the model that samples (its EOS ends a completion, its pad fills the prompts)."""
        return self._teacher_tokenizer if self.cross and self.source == "teacher" else self._tokenizer

    # the engine's hooks: where the run stands, for the seeds
    def on_stage_start(self, stage: StageInfo) -> None:
        self.stage, self.round = int(stage.index), int(stage.round)

    def on_step(self, step: int, total_steps: int) -> None:
        self.step, self.micro = int(step), 0

    def on_batch(self, rank_sizes: tuple[int, ...], rank: int) -> None:
        super().on_batch(rank_sizes, rank)
        self.rank = int(rank)

    def _key(self) -> int:
        return _mix((self.seed, self.round, self.stage, self.step, self.micro, self.rank))

    def _begin(self, batch: Mapping[str, Tensor]) -> int:
        """The checks every rollout micro-batch passes, and its seed (the position counted once)."""
        name = type(self).__name__
        if self._model is None:
            raise KdrunError(f"batch_transform ({name}): not bound to a model (the builder binds it)")
        key = self._key()
        self.micro += 1
        if "prompt_length" not in batch:
            raise KdrunError(f"batch_transform ({name}): the batch has no prompt_length; rollouts need prompt/response "
                             f"data (data=instructions)")
        if "teacher_input_ids" in batch and not (self.cross and "teacher_prompt_length" in batch):
            raise KdrunError(f"batch_transform ({name}): the batch carries the teacher's own tokens (teacher_input_ids) "
                             f"but not the teacher's tokenizer and prompt lengths, so the completions cannot be "
                             f"re-tokenised for it; build the data with data.source.teacher_tokenizer and "
                             f"data.source.alignment=spans or positions (data=instructions)")
        return key

    def _decider(self, micro: int) -> torch.Generator:
        """The generator of the decisions about micro-batch ``micro`` of the step: no rank in its seed, so every
        rank decides alike (a sharded source generates on all ranks or none; no rank waits for another's rollouts)."""
        return torch.Generator().manual_seed(_mix((self.seed, self.round, self.stage, self.step, micro)))

    def _draw(self, micro: int) -> float:
        """The uniform draw that decides micro-batch ``micro`` of the step (the same on every rank)."""
        return float(torch.rand((), generator=self._decider(micro)))

    @property
    def per_step(self) -> bool:
        """True: the engine hands the transform a whole optimizer step's micro-batches (:meth:`window`)."""
        return self.generate_per == "step"

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        key = self._begin(batch)
        if self._draw(self.micro - 1) >= self.on_policy_prob:
            return batch
        return self.generate(batch, key)

    def window(self, batches: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """A step's micro-batches, all generated by one ``generate`` call (with probability lambda) or all kept."""
        keys = [self._begin(b) for b in batches]
        if self._draw(self.micro - len(batches)) >= self.on_policy_prob:  # the draw of the step's first micro-batch
            return list(batches)
        return self.generate_window(batches, keys[0])

    @torch.no_grad()
    def generate(self, batch: Mapping[str, Tensor], key: int) -> dict[str, Tensor]:
        """Sample the completions of one micro-batch (seeded by ``key``) and rebuild it."""
        return self.generate_window([batch], key)[0]

    @torch.no_grad()
    def generate_window(self, window: Sequence[Mapping[str, Tensor]], key: int) -> list[dict[str, Tensor]]:
        """One ``generate`` call (seeded by ``key``) for the prompts of every micro-batch of ``window``; each
        micro-batch is rebuilt from its own rows, to its own width."""
        g = self.samples_per_prompt
        grown = []
        for batch in window:
            if g > 1:  # GRPO: G samples of every prompt, adjacent rows; `group` numbers the prompts of the micro-batch
                batch = {k: v.repeat_interleave(g, dim=0) if isinstance(v, Tensor) and v.dim() >= 1 else v
                         for k, v in batch.items()}
                batch["group"] = torch.arange(batch["input_ids"].shape[0], device=batch["input_ids"].device) // g
            grown.append(batch)
        own = "teacher_" if self.cross and self.source == "teacher" else ""  # the sampler's prompt tokens
        plens = [b[f"{own}prompt_length"].long() for b in grown]
        p = max(int(pl.max()) for pl in plens)
        prompts = torch.cat([_left_padded(b[f"{own}input_ids"], pl, p, int(self.pad_token_id)) for b, pl in zip(grown, plens)])
        plen = torch.cat(plens)
        cols = torch.arange(p, device=prompts.device).view(1, -1)
        attention = (cols >= (p - plen).view(-1, 1)).long()
        if self.teacher_mix > 0:
            out, log_w = self._sample_mixed(prompts, attention, key)
        else:
            out, log_w = self._sample(prompts, attention, key), None
        self.generated += 1
        rows, start = [], 0
        for batch, pl in zip(grown, plens):
            n = pl.shape[0]
            if self.cross:
                rebuilt = self._retokenised(batch, out[start:start + n, p:])
            else:
                rebuilt = rebuild(batch, prompts[start:start + n], pl, out[start:start + n, p:], self.eos_token_id,
                                  int(self.pad_token_id))
            if log_w is not None:
                rebuilt["mix_weight"] = at_prediction_positions(log_w[start:start + n].exp(), pl,
                                                                rebuilt["input_ids"].shape[1], 1.0)
            start += n
            if self._reward is not None:
                self._score(rebuilt, batch, batch["prompt_length"].long())
            rows.append(rebuilt)
        return rows

    def _retokenised(self, batch: Mapping[str, Tensor], completions: Tensor) -> dict[str, Tensor]:
        """The micro-batch rebuilt from the completions' text, each model's prompt followed by its own tokens of
        the text, the spans aligned as the data source aligns them (:mod:`kdrun.data.retokenise`)."""
        from kdrun.data.retokenise import completion_texts, first_of_span, place_spans, tokenise_completions

        s_tok, t_tok = self._tokenizer, self._teacher_tokenizer
        texts, finished = completion_texts(completions, self.eos_token_id, self._sampler_tokenizer)
        ct = tokenise_completions(texts, finished, s_tok, t_tok, self.alignment, completions.device)
        sides = {"": (s_tok, ct.student_ids, ct.student_lengths, ct.student_span),
                 "teacher_": (t_tok, ct.teacher_ids, ct.teacher_lengths, ct.teacher_span)}
        out = dict(batch)
        for prefix, (tok, ids, lengths, span) in sides.items():
            plen = batch[f"{prefix}prompt_length"].long()
            pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
            prompts = _left_padded(batch[f"{prefix}input_ids"], plen, int(plen.max()), pad)
            fields = rebuild({}, prompts, plen, ids, None, pad, lengths=lengths)
            out.update({f"{prefix}{k}": v for k, v in fields.items()})
            out[f"{prefix}span"] = place_spans(span, plen, fields["input_ids"].shape[1])
        out["span_mask"] = first_of_span(out["span"])
        return out

    def for_eval(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Evaluation keeps the data's responses (with ``teacher_mix``, unit ``mix_weight``: nothing was mixed)."""
        if self.teacher_mix > 0:
            return {**batch, "mix_weight": torch.ones(batch["labels"].shape, device=batch["labels"].device)}
        return batch

    @torch.no_grad()
    def _sample_mixed(self, prompts: Tensor, attention: Tensor, key: int) -> tuple[Tensor, Tensor]:
        """MiniLLM's teacher-mixed sampling: ``max_new_tokens`` steps of both models on their key/value caches, each
        token drawn from ``(1 - alpha) q_T + alpha p_T`` (softmax at ``temperature``) by ``torch.multinomial`` on the
        run's seeded generator, as Hugging Face's sampling draws; returns the sequences (B, P + M, padded after EOS)
        and ``log q(y_t) - log mix(y_t)`` (B, M) of every drawn token (0 after EOS). The loop over positions is the
        autoregressive generation itself; it stops when every row has emitted EOS (one host read per token, as
        ``generate`` does)."""
        student, teacher, a = self._model, self._mixer, self.teacher_mix
        models = [student, teacher]
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        units = [u for m in models for u in fsdp_units(m)]
        b = prompts.shape[0]
        pad, eos = int(self.pad_token_id), self.eos_token_id
        devices = [prompts.device] if prompts.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), gathered(units):
                torch.manual_seed(key)
                mask = attention
                position = (mask.cumsum(1) - 1).clamp_min(0)
                outs = [m(input_ids=prompts, attention_mask=mask, position_ids=position, use_cache=True) for m in models]
                done = torch.zeros(b, dtype=torch.bool, device=prompts.device)
                tokens, log_w = [], []
                cache_in = [_cache_argument(m) for m in models]  # once per model, not at every token
                cache_out = "cache" if "cache" in outs[0].keys() else "past_key_values"
                for _ in range(self.max_new_tokens):
                    log_q, log_p = (torch.log_softmax(o.logits[:, -1].float() / self.temperature, dim=-1) for o in outs)
                    log_m = torch.logaddexp(log_q + math.log1p(-a), log_p + math.log(a))
                    y = torch.multinomial(log_m.exp(), 1).squeeze(1)
                    w = (log_q - log_m).gather(1, y.view(-1, 1)).squeeze(1)
                    y = torch.where(done, torch.full_like(y, pad), y)
                    tokens.append(y)
                    log_w.append(torch.where(done, torch.zeros_like(w), w))
                    if eos is not None:
                        done = done | (y == eos)
                        if bool(done.all()):
                            break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    position = mask.sum(dim=1, keepdim=True) - 1
                    outs = [m(input_ids=y.view(-1, 1), attention_mask=mask, position_ids=position, use_cache=True,
                              **{arg: o[cache_out]}) for m, arg, o in zip(models, cache_in, outs)]
                return torch.cat([prompts, torch.stack(tokens, dim=1)], dim=1), torch.stack(log_w, dim=1)
        finally:
            for m, mode in zip(models, modes):
                m.train(mode)

    def _sample(self, prompts: Tensor, attention: Tensor, key: int) -> Tensor:
        """``generate`` on left-padded prompts in eval mode, seeded by ``key``, the global generators restored.
        An FSDP-sharded source is gathered whole for the call (``gather_sharded``), or runs HF's ``synced_gpus``
        loop, which keeps every rank stepping until all ranks are done."""
        model = self._model
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                                  "top_k": self.top_k, "top_p": self.top_p, "pad_token_id": self.pad_token_id,
                                  "eos_token_id": self.eos_token_id}
        sharded = fsdp_units(model)
        # gathered (or not sharded): every rank stops at its own longest completion. Said explicitly, because HF
        # turns synced_gpus on by itself for any FSDP-managed model, which would keep the ranks stepping together
        kwargs["synced_gpus"] = bool(sharded) and not self.gather_sharded
        was_training = model.training
        model.eval()
        devices = [prompts.device] if prompts.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices), gathered(sharded if self.gather_sharded else []):
                torch.manual_seed(key)
                return model.generate(input_ids=prompts, attention_mask=attention, **kwargs)
        finally:
            model.train(was_training)

    def _score(self, rebuilt: dict[str, Tensor], batch: Mapping[str, Tensor], plen: Tensor) -> None:
        """The reward of each completion against the data's response, and KDRL's reward-guided mask."""
        start = plen - 1
        completion, c_mask = scored_tokens(rebuilt["labels"], rebuilt["token_mask"], start)
        reference, r_mask = scored_tokens(batch["labels"], batch["token_mask"] != 0, start)
        reward = self._reward(completion, c_mask, reference, r_mask, self._tokenizer).to(plen.device).float()
        rebuilt["reward"] = reward
        # KDRL's reward-guided masking: the distillation term on the responses that earned no reward only
        rebuilt["unrewarded_token_mask"] = rebuilt["token_mask"] & (reward <= 0).view(-1, 1)

    def __repr__(self) -> str:
        return (f"Rollout(source={self.source}, on_policy_prob={self.on_policy_prob}, max_new_tokens={self.max_new_tokens}, "
                f"temperature={self.temperature}, top_k={self.top_k}, top_p={self.top_p}, "
                f"samples_per_prompt={self.samples_per_prompt}, generate_per={self.generate_per})")


class PPORollout(Rollout):
    """MiniLLM's PPO inner epochs (Gu et al., ICLR 2024; the authors' ``--ppo-epochs`` 4): every generated window (the
    micro-batches of one optimizer step, ``generate_per: step``) trains ``ppo_epochs`` consecutive optimizer steps.

    Right after sampling, one no-grad forward of the student (in eval mode, as it sampled) adds ``batch.old_logp``
    (B, L): the log-probability of each sampled token under the weights that sampled it (0 where nothing is scored),
    for the clipped ratio of :class:`kdrun.losses.MiniLLMLoss` (``old_logp`` input). The data's batches of the reuse
    steps are not used. The stored window and its use count are the transform's checkpointed state (every rank's), so
    a resumed run reuses what an uninterrupted one would.

    The authors collect 256 rollouts and run 4 epochs over them in shuffled mini-batches; kdrun reuses each window for
    ``ppo_epochs`` consecutive steps (a buffer of one window): the same number of updates per rollout, in another
    order. Other arguments: :class:`Rollout`'s (``on_policy_prob`` must be 1).
    """

    checkpointed = True

    def __init__(self, ppo_epochs: int = 4, chunk_rows: int = 1, **kwargs: Any) -> None:
        kwargs.setdefault("generate_per", "step")
        if kwargs["generate_per"] != "step" or kwargs.get("on_policy_prob", 1.0) != 1.0 or int(ppo_epochs) < 1:
            raise ValueError(f"PPO rollouts: need ppo_epochs >= 1, generate_per=step (a window is what is reused) and "
                             f"on_policy_prob=1; got {ppo_epochs}, {kwargs['generate_per']}, {kwargs.get('on_policy_prob')}")
        super().__init__(**kwargs)
        self.ppo_epochs, self.chunk_rows = int(ppo_epochs), max(1, int(chunk_rows))
        self.stored: list[dict[str, Tensor]] = []
        self.uses = 0
        self.replayed = 0  # windows served again (logged by tests and benchmarks)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:  # the build's shape trace
        return self._with_old_logp(super().__call__(batch))

    def window(self, batches: Sequence[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        keys = [self._begin(b) for b in batches]
        if self.stored and self.uses < self.ppo_epochs and len(self.stored) == len(batches):
            self.uses += 1
            self.replayed += 1
            return [{**s, "index": b["index"]} if "index" in b else dict(s) for s, b in zip(self.stored, batches)]
        out = [self._with_old_logp(o) for o in self.generate_window(batches, keys[0])]
        self.stored = [{k: v.detach() for k, v in o.items() if k != "index"} for o in out]
        self.uses = 1
        return out

    @torch.no_grad()
    def _with_old_logp(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """``batch`` with ``old_logp``: the student's log-probability of every scored token, in chunks of
        ``chunk_rows`` rows (the float32 log-softmax of one chunk at a time)."""
        model = self._model
        was_training = model.training
        model.eval()
        try:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        finally:
            model.train(was_training)
        from kdrun.losses.preference import token_log_probs

        old = token_log_probs(logits, batch["labels"][:, :logits.shape[1]], self.chunk_rows)
        return {**batch, "old_logp": torch.where(batch["token_mask"][:, :old.shape[1]], old, torch.zeros_like(old))}

    def get_extra_state(self) -> dict[str, Any]:
        mine = {"stored": [{k: v.cpu() for k, v in b.items()} for b in self.stored]}
        # every rank saves the checkpoint (rank 0 writes it): each rank's window, in rank order
        return {"uses": self.uses, "replayed": self.replayed, "generated": self.generated,
                "ranks": all_gather_object(mine, launched_info())}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        ranks, info = state["ranks"], launched_info()  # the process's rank: the hooks' is not set when a checkpoint loads
        if len(ranks) != info.world_size:
            raise KdrunError(f"resume: the stored rollouts (batch_transform PPORollout) were saved by {len(ranks)} ranks "
                             f"and this run has {info.world_size}; resume with {len(ranks)}")
        self.uses, self.replayed, self.generated = int(state["uses"]), int(state["replayed"]), int(state["generated"])
        device = next(self._model.parameters()).device if self._model is not None else "cpu"
        self.stored = [{k: v.to(device) for k, v in b.items()} for b in ranks[info.rank]["stored"]]

    def __repr__(self) -> str:
        return f"PPORollout(ppo_epochs={self.ppo_epochs}, {super().__repr__()})"


class AdaptiveReplay(Rollout):
    """DistiLLM's adaptive off-policy schedule (Ko et al., "DistiLLM: Towards Streamlined Distillation for Large
    Language Models", ICML 2024; the authors' ``finetune.py``): student generations kept in a replay buffer, used
    more often when the held-out loss rises.

    - **Threshold** ``tau`` starts at ``init_threshold`` (0.0). After every evaluation, if the test loss is at
      least the previous evaluation's plus ``loss_eps`` (0.1), ``tau`` rises by ``threshold_step`` (0.1), capped
      at 1.
    - **Per micro-batch**, a draw ``r ~ U(0, 1)`` (the same on every rank):
      - if ``r < tau (1 - step / total_steps)`` (the decreasing ratio), or ``r < tau`` while the buffer holds fewer
        than ``capacity`` (1000) examples: the student generates the batch (:class:`Rollout`), which is stored;
      - else, if ``r < tau``: a stored micro-batch (a seeded choice) is replayed;
      - else: the data's batch.
    - **The buffer** is first in, first out, and holds whole micro-batches. DistiLLM samples single examples from
      its buffer; kdrun replays a stored micro-batch whole, so that no Python loop over examples runs in the step.

    The buffer, ``tau`` and the last test loss are the transform's checkpointed state. Under data parallelism each
    rank keeps its own generations (the decisions agree), and a checkpoint holds every rank's, so a resumed run
    replays what an uninterrupted one would. ``on_policy_prob`` is unused (the schedule decides).
    """

    checkpointed = True

    def __init__(self, capacity: int = 1000, init_threshold: float = 0.0, loss_eps: float = 0.1,
                 threshold_step: float = 0.1, max_new_tokens: int = 64, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, eos_token_id: int | None = None, pad_token_id: int | None = None) -> None:
        super().__init__("student", 1.0, max_new_tokens, temperature, top_k, top_p, eos_token_id, pad_token_id)
        if int(capacity) < 1 or not 0.0 <= init_threshold <= 1.0 or loss_eps < 0 or threshold_step < 0:
            raise ValueError(f"adaptive replay: need capacity >= 1, init_threshold in [0, 1], loss_eps >= 0 and "
                             f"threshold_step >= 0; got {capacity}, {init_threshold}, {loss_eps}, {threshold_step}")
        self.capacity, self.loss_eps, self.threshold_step = int(capacity), float(loss_eps), float(threshold_step)
        self.tau, self.last_loss = float(init_threshold), None
        self.total_steps = 1
        self.buffer: list[dict[str, Tensor]] = []
        self.replayed = 0
        self.live = False  # False during the build's shape trace: nothing is decided or stored

    def on_stage_start(self, stage: StageInfo) -> None:
        super().on_stage_start(stage)
        self.live = True

    def on_step(self, step: int, total_steps: int) -> None:
        super().on_step(step, total_steps)
        self.total_steps = max(1, int(total_steps))

    def on_evaluation(self, metrics: Mapping[str, Any]) -> None:
        loss = metrics.get("test_loss")
        if loss is None:
            return
        if self.last_loss is not None and float(loss) >= self.last_loss + self.loss_eps:
            self.tau = min(1.0, self.tau + self.threshold_step)
        self.last_loss = float(loss)

    def _stored(self) -> int:
        return sum(int(b["input_ids"].shape[0]) for b in self.buffer)

    def __call__(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        key = self._begin(batch)
        if not self.live:  # the build's shape trace: a generated batch, stored nowhere
            return self.generate(batch, key)
        choose = self._decider(self.micro - 1)  # the same on every rank, so the buffers grow alike
        r = float(torch.rand((), generator=choose))
        fresh = r < self.tau * (1.0 - self.step / self.total_steps) or (r < self.tau and self._stored() < self.capacity)
        if fresh:
            out = self.generate(batch, key)
            self.buffer.append({k: v.detach() for k, v in out.items() if k != "index"})
            while len(self.buffer) > 1 and self._stored() > self.capacity:
                self.buffer.pop(0)
            return out
        if r < self.tau and self.buffer:
            self.replayed += 1
            pick = int(torch.randint(len(self.buffer), (), generator=choose))
            return {**self.buffer[pick], "index": batch["index"]} if "index" in batch else dict(self.buffer[pick])
        return batch

    def get_extra_state(self) -> dict[str, Any]:
        ranks = all_gather_object({"buffer": [{k: v.cpu() for k, v in b.items()} for b in self.buffer]}, launched_info())
        return {"tau": self.tau, "last_loss": self.last_loss, "replayed": self.replayed, "generated": self.generated,
                "ranks": ranks}

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.tau, self.last_loss = float(state["tau"]), state.get("last_loss")
        self.replayed, self.generated = int(state.get("replayed", 0)), int(state.get("generated", 0))
        ranks, info = state["ranks"], launched_info()
        if len(ranks) != info.world_size:
            raise KdrunError(f"resume: the replay buffer (batch_transform AdaptiveReplay) was saved by {len(ranks)} ranks "
                             f"and this run has {info.world_size}; resume with {len(ranks)}")
        device = self._model.device if self._model is not None and hasattr(self._model, "device") else "cpu"
        # the process's rank: the hooks' rank is not set yet when a checkpoint is loaded
        self.buffer = [{k: v.to(device) for k, v in b.items()} for b in ranks[info.rank]["buffer"]]

    def __repr__(self) -> str:
        return (f"AdaptiveReplay(capacity={self.capacity}, tau={self.tau}, loss_eps={self.loss_eps}, "
                f"max_new_tokens={self.max_new_tokens}, temperature={self.temperature})")


__all__ = ["AdaptiveReplay", "Rollout", "rebuild", "scored_tokens"]
