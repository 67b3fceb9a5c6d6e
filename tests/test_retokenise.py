"""Rollouts across tokenizers (kdrun.data.retokenise): the batched span alignment against the per-text one,
and a rollout whose completions are the data's own responses rebuilt into exactly the data source's batch --
each model's tokens, labels, masks and spans -- whichever model samples and under either alignment."""
from __future__ import annotations

import json
import random

import pytest
import torch

from kdrun.component import BuildContext, StageInfo
from kdrun.data.alignment import batched_span_groups, span_groups
from kdrun.data.rollout import Rollout, scored_tokens
from kdrun.data.text import instructions
from kdrun.errors import KdrunError

SMALL = {"train": {"corpus": "pydoc_topics", "vocab_size": 300}}
LARGE = {"train": {"corpus": "pydoc_topics", "vocab_size": 700}}


def _ends(rng: random.Random, n: int) -> list[int]:
    out, at = [], 0
    for k in range(n):
        at += rng.choice([0, 1, 1, 2, 3]) if k else rng.randint(1, 3)  # 0: a byte token ending where the last did
        out.append(at)
    return out


def test_batched_span_groups_equal_the_per_text_alignment():
    rng = random.Random(0)
    for _ in range(200):
        rows = [(_ends(rng, rng.randint(0, 12)), _ends(rng, rng.randint(0, 12))) for _ in range(4)]
        width_s, width_t = max(len(a) for a, _ in rows), max(len(b) for _, b in rows)
        s = torch.zeros(4, width_s, dtype=torch.long)
        t = torch.zeros(4, width_t, dtype=torch.long)
        sv, tv = torch.zeros_like(s, dtype=torch.bool), torch.zeros_like(t, dtype=torch.bool)
        for i, (a, b) in enumerate(rows):
            s[i, :len(a)], sv[i, :len(a)] = torch.tensor(a, dtype=torch.long), True
            t[i, :len(b)], tv[i, :len(b)] = torch.tensor(b, dtype=torch.long), True
        got_s, got_t = batched_span_groups(s, sv, t, tv)
        for i, (a, b) in enumerate(rows):
            want_s, want_t = span_groups(a, b)
            assert got_s[i].tolist() == want_s + [-1] * (width_s - len(a))
            assert got_t[i].tolist() == want_t + [-1] * (width_t - len(b))


def _data(tmp_path, alignment: str, max_length: int = 64):
    rows = [{"prompt": f"Add {a} and {b}.", "response": f"The sum of {a} and {b} is {a + b}; résumé noted."}
            for a in range(3) for b in range(2)]
    rows.append({"prompt": "Say nothing.", "response": ""})  # an empty completion: EOS alone, a span of its own
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return instructions(SMALL, str(path), teacher_tokenizer=LARGE, alignment=alignment, max_length=max_length,
                        test_fraction=0.2)


class Replay(torch.nn.Module):
    """A 'model' whose generate appends given completions (B, M): the data's own responses, so the rollout must
    rebuild the data's own batch."""

    def __init__(self, completions: torch.Tensor) -> None:
        super().__init__()
        self.completions = completions
        self.lin = torch.nn.Linear(1, 1)

    def generate(self, input_ids, attention_mask, **kwargs):
        return torch.cat([input_ids, self.completions], dim=1)


def _responses(f, prefix: str, pad: int) -> torch.Tensor:
    ids, mask = scored_tokens(f[f"{prefix}labels"], f[f"{prefix}token_mask"], f[f"{prefix}prompt_length"] - 1)
    return torch.cat([torch.where(mask, ids, torch.full_like(ids, pad)), torch.full_like(ids[:, :2], pad)], dim=1)


def _trimmed(v: torch.Tensor, width: int) -> torch.Tensor:
    return v[:, :width]


@pytest.mark.parametrize("alignment", ["spans", "positions"])
@pytest.mark.parametrize("source", ["student", "teacher"])
def test_completions_that_are_the_data_s_responses_rebuild_the_data_s_batch(tmp_path, alignment, source):
    splits = _data(tmp_path, alignment)
    f = {k: v for k, v in splits.train.items()}
    sampler = splits.teacher_tokenizer if source == "teacher" else splits.tokenizer
    prefix = "teacher_" if source == "teacher" else ""
    model = Replay(_responses(f, prefix, sampler.pad_token_id))
    r = Rollout(source=source, max_new_tokens=model.completions.shape[1])
    r.bind(BuildContext(shapes={}, num_train=len(f["input_ids"]), models={source: model}, seed=0,
                        teacher_tokenizer=splits.teacher_tokenizer, alignment=alignment), splits.tokenizer)
    assert r.cross and r.eos_token_id == sampler.eos_token_id
    r.on_stage_start(StageInfo(name="distill", index=0, round=0, trained_models=("student",), frozen_models=(),
                               epochs=1, max_steps=None))
    r.on_step(0, 1)
    out = r(dict(f))
    assert r.generated == 1
    for side in ("", "teacher_"):
        width = out[f"{side}input_ids"].shape[1]
        assert width == int(f[f"{side}attention_mask"].sum(1).max())  # the longest example, as the data cut it
        for k in ("input_ids", "attention_mask", "labels", "token_mask"):
            want = _trimmed(f[f"{side}{k}"], width)
            assert torch.equal(out[f"{side}{k}"].to(want.dtype), want), (side, k)
        assert torch.equal(out[f"{side}span"], _trimmed(f[f"{side}span"], width)), side
    assert torch.equal(out["span_mask"], _trimmed(f["span_mask"], out["input_ids"].shape[1]))
    assert int(out["span_mask"].sum()) > 0


def test_a_completion_cut_before_its_eos_gets_no_eos_on_either_side(tmp_path):
    splits = _data(tmp_path, "spans")
    f = splits.train
    full = _responses(f, "", splits.tokenizer.pad_token_id)
    model = Replay(full[:, :4])  # four tokens of every response, none of them EOS for the longer ones
    r = Rollout(max_new_tokens=4)
    r.bind(BuildContext(shapes={}, num_train=len(f["input_ids"]), models={"student": model}, seed=0,
                        teacher_tokenizer=splits.teacher_tokenizer, alignment="spans"), splits.tokenizer)
    r.on_step(0, 1)
    out = r(dict(f))
    s_eos, t_eos = splits.tokenizer.eos_token_id, splits.teacher_tokenizer.eos_token_id
    long_rows = (f["token_mask"].sum(1) > 4).nonzero().flatten()
    assert len(long_rows) > 0
    for i in long_rows.tolist():
        s_text = splits.tokenizer.decode(out["labels"][i][out["token_mask"][i]].tolist())
        t_text = splits.teacher_tokenizer.decode(out["teacher_labels"][i][out["teacher_token_mask"][i]].tolist())
        assert s_text == t_text == splits.tokenizer.decode(full[i, :4].tolist())  # the same text for both models
        assert s_eos not in out["labels"][i].tolist() and t_eos not in out["teacher_labels"][i].tolist()


def test_teacher_tokens_without_the_teacher_tokenizer_are_refused(tmp_path):
    splits = _data(tmp_path, "spans")
    r = Rollout(max_new_tokens=2, eos_token_id=1, pad_token_id=0)
    r.bind(BuildContext(shapes={}, num_train=4, models={"student": Replay(torch.zeros(1, 1, dtype=torch.long))}))
    with pytest.raises(KdrunError, match="teacher_tokenizer"):
        r(dict(splits.train))


def _tiny_lm(vocab: int, seed: int):
    from kdrun.models.hf import causal_lm

    torch.manual_seed(seed)
    return causal_lm(config={"model_type": "qwen2", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                             "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128,
                             "vocab_size": vocab})


@pytest.mark.parametrize("source", ["student", "teacher"])
def test_sampled_completions_are_one_text_spelled_by_both_models_span_by_span(tmp_path, source):
    splits = _data(tmp_path, "spans")
    s_tok, t_tok = splits.tokenizer, splits.teacher_tokenizer
    model = _tiny_lm(len(t_tok) if source == "teacher" else len(s_tok), seed=3)
    r = Rollout(source=source, max_new_tokens=12)
    r.bind(BuildContext(shapes={}, num_train=7, models={source: model}, seed=0, teacher_tokenizer=t_tok,
                        alignment="spans"), s_tok)
    r.on_step(0, 1)
    f = splits.train
    out = r(dict(f))
    for i in range(f["input_ids"].shape[0]):
        # each model's prompt is the data's, untouched
        for side in ("", "teacher_"):
            n = int(f[f"{side}prompt_length"][i])
            assert torch.equal(out[f"{side}input_ids"][i, :n], f[f"{side}input_ids"][i, :n])
        s_text = s_tok.decode(out["labels"][i][out["token_mask"][i]].tolist(), skip_special_tokens=True)
        t_text = t_tok.decode(out["teacher_labels"][i][out["teacher_token_mask"][i]].tolist(), skip_special_tokens=True)
        assert s_text == t_text and len(s_text) > 0
        span, t_span = out["span"][i], out["teacher_span"][i]
        for g in range(int(span.max()) + 1):  # every span: the same characters on both sides
            a, b = out["labels"][i][span == g].tolist(), out["teacher_labels"][i][t_span == g].tolist()
            assert len(a) and len(b) and s_tok.decode(a) == t_tok.decode(b)
        assert int(out["span_mask"][i].sum()) == int(span.max()) + 1
