"""Teachers with their own tokenizer: span alignment, exact token maps, the data's teacher view and the
cross-tokenizer divergence against hand computations."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.data.alignment import exact_token_map, position_groups, span_groups, tokenizer_map
from kdrun.data.tensors import TensorLoader
from kdrun.data.text import instructions, train_tokenizer
from kdrun.errors import KdrunError
from kdrun.losses import CrossTokenizerDivergence, TokenDivergence

SMALL = {"train": {"corpus": "pydoc_topics", "vocab_size": 300}}
LARGE = {"train": {"corpus": "pydoc_topics", "vocab_size": 700}}


def test_span_groups_close_where_both_tokenizations_end_together():
    # "ab|cde|f" vs "a|b|cdef": common ends at 2 and 6
    assert span_groups([2, 5, 6], [1, 2, 6]) == ([0, 1, 1], [0, 0, 1])
    # a character split into two byte tokens (both end at 3) stays in one span; a tail without a common end is -1
    assert span_groups([1, 3, 3, 5], [1, 3, 4]) == ([0, 1, 1, -1], [0, 1, -1])
    assert position_groups(3, 2) == ([0, 1, -1], [0, 1])


def test_exact_token_map_pairs_unique_equal_strings_and_eos():
    student = ["<pad>", "<eos>", "a", "b", "ab", "x", "x", "\ufffd"]
    teacher = ["</s>", "b", "ab", "a", "x", "\ufffd", "c"]
    m = exact_token_map(student, teacher, student_eos=1, teacher_eos=0)
    # a, b, ab pair; x repeats in the student's vocabulary and the replacement character never pairs; eos <-> eos
    assert sorted(zip(m.student, m.teacher)) == [(1, 0), (2, 3), (3, 1), (4, 2)]
    assert m.eos_paired


def test_tokenizer_map_of_one_family_is_the_identity():
    tok = train_tokenizer(vocab_size=300)
    m = tokenizer_map(tok, tok)
    assert m.student == m.teacher == list(range(len(tok)))  # byte tokens too: they pair by their vocabulary entries


def _rows(tmp_path, text="The sum of {a} and {b} is {c}; résumé noted."):
    path = tmp_path / "rows.jsonl"
    rows = [{"prompt": f"Add {a} and {b}.", "response": text.format(a=a, b=b, c=a + b)} for a in range(5) for b in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_every_span_spells_the_same_text_for_both_models(tmp_path):
    splits = instructions(SMALL, _rows(tmp_path), teacher_tokenizer=LARGE, alignment="spans", max_length=48)
    s_tok, t_tok = splits.tokenizer, train_tokenizer(vocab_size=700)
    f = splits.train
    assert f["teacher_input_ids"].shape[1] != f["input_ids"].shape[1]  # each model's own length
    multi = 0
    for i in range(f["input_ids"].shape[0]):
        span, t_span = f["span"][i], f["teacher_span"][i]
        assert int(f["span_mask"][i].sum()) == int(span.max()) + 1  # one mask entry per span
        for g in range(int(span.max()) + 1):
            a, b = f["labels"][i][span == g].tolist(), f["teacher_labels"][i][t_span == g].tolist()
            assert s_tok.decode(a) == t_tok.decode(b)
            multi += len(a) != len(b)
        # the teacher scores exactly its response (and EOS), the student likewise
        assert bool(((t_span >= 0) == f["teacher_token_mask"][i]).all())
    assert multi > 0  # the two vocabularies really split differently


def test_a_cut_response_is_cut_at_the_same_character_for_the_teacher(tmp_path):
    splits = instructions(SMALL, _rows(tmp_path, "word " * 40), teacher_tokenizer=LARGE, alignment="spans", max_length=20)
    s_tok, t_tok = splits.tokenizer, train_tokenizer(vocab_size=700)
    f = splits.train
    for i in range(3):
        s = s_tok.decode(f["labels"][i][f["token_mask"][i]].tolist())
        t = t_tok.decode(f["teacher_labels"][i][f["teacher_token_mask"][i]].tolist())
        assert s == t and s.count("word") < 40  # the student's cut, and no EOS on either side


def test_alignment_needs_the_teacher_tokenizer(tmp_path):
    with pytest.raises(KdrunError, match="teacher_tokenizer"):
        instructions(SMALL, _rows(tmp_path), alignment="spans")
    with pytest.raises(KdrunError, match="alignment must be one of"):
        instructions(SMALL, _rows(tmp_path), teacher_tokenizer=LARGE, alignment="bytes")


def test_loader_cuts_teacher_fields_by_their_own_lengths(tmp_path):
    splits = instructions(SMALL, _rows(tmp_path), teacher_tokenizer=LARGE, alignment="spans", max_length=48)
    loader = TensorLoader(splits.train, batch_size=5, train=False, device=torch.device("cpu"), trim_field="attention_mask")
    batch = next(iter(loader))
    assert batch["teacher_input_ids"].shape[1] == int(batch["teacher_attention_mask"].sum(1).max())
    assert batch["teacher_span"].shape[1] == batch["teacher_input_ids"].shape[1]
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())


class _Ctx:
    def __init__(self, vs: int, vt: int) -> None:
        self.shapes = {"student": torch.Size([1, 1, vs]), "teacher": torch.Size([1, 1, vt])}
        self.device = torch.device("cpu")


def _term(vs, vt, **kw):
    term = CrossTokenizerDivergence(**kw)
    term.setup(_Ctx(vs, vt))
    return term


def test_identical_tokenizers_give_the_token_level_divergence(tmp_path):
    splits = instructions(SMALL, _rows(tmp_path, "The sum of {a} and {b} is {c}."), teacher_tokenizer=SMALL,
                          alignment="spans", max_length=40)
    f = splits.train
    b, length = f["input_ids"].shape
    lt = f["teacher_input_ids"].shape[1]
    torch.manual_seed(0)
    zs = torch.randn(b, length, 300)
    zt = torch.zeros(b, lt, 300)
    zt_full = torch.zeros(b, length, 300)
    zt_full[:, :min(length, lt)] = zt[:, :min(length, lt)] = torch.randn(b, min(length, lt), 300)
    for kind in ("fkl", "rkl", "jsd"):
        term = _term(300, 300, student_tokenizer=SMALL, teacher_tokenizer=SMALL, kind=kind)
        got = term(zs, zt, f["labels"], f["teacher_labels"], f["span"], f["teacher_span"], f["span_mask"])
        want = TokenDivergence(kind=kind)(zs, zt_full, f["token_mask"])
        assert torch.allclose(got, want, atol=1e-5), kind


def _reference(zs, zt, ys, yt, s_groups, t_groups, s_ids, t_ids, vocab, merge, kind="fkl"):
    """One sequence, by the formulas: loops over spans."""
    ls, lt = F.log_softmax(zs, -1), F.log_softmax(zt, -1)

    def merged(logp, y, positions):
        base = positions[0] if merge == "observed" else positions[-1]
        return logp[base] + sum(logp[p, y[p]] for p in positions if p != base)

    vals = []
    for sg, tg in zip(s_groups, t_groups):
        qs, pt = merged(ls, ys, sg), merged(lt, yt, tg)
        if vocab == "uld":
            a, c = pt.exp().sort(descending=True).values, qs.exp().sort(descending=True).values
            w = max(len(a), len(c))
            vals.append((F.pad(a, (0, w - len(a))) - F.pad(c, (0, w - len(c)))).abs().sum())
            continue
        qn, pn = qs - torch.logsumexp(qs, 0), pt - torch.logsumexp(pt, 0)
        if vocab == "exact_map":
            q = torch.cat([qn[s_ids].exp(), (1 - qn[s_ids].exp().sum()).view(1)])
            p = torch.cat([pn[t_ids].exp(), (1 - pn[t_ids].exp().sum()).view(1)])
            vals.append((p * (p.log() - q.log())).sum() if kind == "fkl" else (q * (q.log() - p.log())).sum())
            continue
        q, p = qs[s_ids].softmax(0), pt[t_ids].softmax(0)  # hybrid: renormalised over the matched ids
        matched = (p * (p.log() - q.log())).sum()
        rest_s = [i for i in range(len(qs)) if i not in s_ids]
        rest_t = [i for i in range(len(pt)) if i not in t_ids]
        a, c = pt[rest_t].exp().sort(descending=True).values, qs[rest_s].exp().sort(descending=True).values
        w = max(len(a), len(c))
        vals.append(matched + (F.pad(a, (0, w - len(a))) - F.pad(c, (0, w - len(c)))).abs().sum())
    return torch.stack(vals).mean()


@pytest.mark.parametrize("vocab", ["exact_map", "hybrid", "uld"])
@pytest.mark.parametrize("merge", ["observed", "last"])
def test_divergence_matches_the_formula_on_a_hand_built_alignment(vocab, merge):
    torch.manual_seed(1)
    vs, vt = 6, 5
    s_ids, t_ids = [0, 2, 3], [4, 1, 0]  # student 0 is teacher 4, ...
    # student positions 1..4 score 4 tokens in spans [0], [1, 2], [3]; teacher positions 2..5 in [0, 1], [2], [3]
    span = torch.tensor([[-1, 0, 1, 1, 2, -1]])
    t_span = torch.tensor([[-1, -1, 0, 0, 1, 2, -1]])
    ys = torch.tensor([[0, 3, 1, 5, 2, 0]])
    yt = torch.tensor([[0, 0, 2, 4, 1, 3, 0]])
    mask = torch.tensor([[False, True, True, False, True, False]])
    zs, zt = torch.randn(1, 6, vs, requires_grad=True), torch.randn(1, 7, vt)
    term = _term(vs, vt, token_map={"student": s_ids, "teacher": t_ids}, vocab=vocab, merge=merge)
    got = term(zs, zt, ys, yt, span, t_span, mask)
    want = _reference(zs[0], zt[0], ys[0], yt[0], [[1], [2, 3], [4]], [[2, 3], [4], [5]], s_ids, t_ids, vocab, merge)
    assert torch.allclose(got, want, atol=1e-5)
    got.backward()
    assert zs.grad[0, 0].abs().sum() == 0 and zs.grad[0, 1:5].abs().sum() > 0  # only scored positions get gradients


def test_hybrid_adaptive_weight_is_the_matched_share_of_the_teacher_vocabulary():
    term = _term(6, 5, token_map={"student": [0, 2], "teacher": [4, 1]}, vocab="hybrid", matched_weight=None)
    assert math.isclose(term.adaptive, 2 / 5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="needs student_tokenizer"):
        CrossTokenizerDivergence(vocab="exact_map")
    term = CrossTokenizerDivergence(vocab="uld")
    with pytest.raises(ValueError, match="'teacher_span' has shape"):
        term.check_shapes(student=torch.Size([2, 5, 7]), teacher=torch.Size([2, 6, 9]), student_target=torch.Size([2, 5]),
                          teacher_target=torch.Size([2, 6]), span=torch.Size([2, 5]), teacher_span=torch.Size([2, 5]),
                          mask=torch.Size([2, 5]))
    mapped = CrossTokenizerDivergence(token_map={"student": [0, 9], "teacher": [1, 2]})
    with pytest.raises(ValueError, match="do not belong to these models"):
        mapped.check_shapes(student=torch.Size([2, 5, 7]), teacher=torch.Size([2, 6, 9]), student_target=torch.Size([2, 5]),
                            teacher_target=torch.Size([2, 6]), span=torch.Size([2, 5]), teacher_span=torch.Size([2, 6]),
                            mask=torch.Size([2, 5]))


def test_positions_alignment_pairs_the_kth_tokens(tmp_path):
    f = instructions(SMALL, _rows(tmp_path), teacher_tokenizer=LARGE, alignment="positions", max_length=48).train
    for i in range(3):
        n_s, n_t = int(f["token_mask"][i].sum()), int(f["teacher_token_mask"][i].sum())
        # every span is one token on each side; the longer side's tail (before EOS) is unscored, EOS pairs with EOS
        assert int(f["span_mask"][i].sum()) == min(n_s, n_t)
        assert (f["span"][i] >= 0).sum() == (f["teacher_span"][i] >= 0).sum() == min(n_s, n_t)


def test_classifiers_read_the_same_sentences_through_their_own_tokenizers(tmp_path):
    from kdrun.data.text import text_classification

    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"sentence": f"a résumé of film number {i} " * (1 + i % 3), "label": i % 2}) + "\n"
                            for i in range(12)))
    splits = text_classification(SMALL, str(path), model_tokenizers={"teacher2": LARGE}, max_length=128, padding="longest")
    f = splits.train
    large = train_tokenizer(vocab_size=700)
    for i in range(3):
        own = f["teacher2_input_ids"][i][f["teacher2_attention_mask"][i].bool()].tolist()
        mine = f["input_ids"][i][f["attention_mask"][i].bool()].tolist()
        assert large.decode(own) == splits.tokenizer.decode(mine) and len(own) < len(mine)
    batch = next(iter(TensorLoader(f, batch_size=4, train=False, device=torch.device("cpu"), trim_field="attention_mask")))
    assert batch["teacher2_input_ids"].shape[1] == int(batch["teacher2_attention_mask"].sum(1).max())
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    with pytest.raises(KdrunError, match="must be a model name"):
        text_classification(SMALL, str(path), model_tokenizers={"bad-name": LARGE})
