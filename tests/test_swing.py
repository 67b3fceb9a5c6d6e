"""Swing distillation: privacy scores, the withheld teacher targets, canaries in the training text and the exposure
of a secret."""
from __future__ import annotations

import math

import pytest
import torch

from kdrun.data.text import text_corpus, train_tokenizer
from kdrun.exposure import exposure
from kdrun.losses import PrivacyScores, SwingDistillationLoss
from kdrun.losses.tokens import kl

TOK = {"train": {"corpus": "pydoc_topics", "vocab_size": 300}}


def test_privacy_scores_mark_tokens_with_digits():
    tok = train_tokenizer(vocab_size=300)
    scorer = PrivacyScores(tok)
    ids = torch.tensor([tok("my PIN is 4071")["input_ids"]])
    out = scorer({"labels": torch.cat([ids, torch.full((1, 1), -100)], 1)})
    text = [tok.decode([t]) for t in ids[0].tolist()]
    assert out["privacy"][0, :-1].tolist() == [1.0 if any(c.isdigit() for c in s) else 0.0 for s in text]
    assert out["privacy"][0, -1] == 0 and out["privacy"].sum() > 0


def test_teacher_targets_are_tempered_and_noised_only_where_private():
    torch.manual_seed(0)
    zt = torch.randn(1, 3, 5)
    privacy = torch.tensor([[0.0, 1.0, 0.5]])
    term = SwingDistillationLoss(temperature=1.0, private_temperature=3.0, noise=0.0)
    log_t = term.teacher_targets(zt, privacy)
    for t, temp in enumerate((1.0, 3.0, 2.0)):
        assert torch.allclose(log_t[0, t], torch.log_softmax(zt[0, t] / temp, -1), atol=1e-6)
    noisy = SwingDistillationLoss(noise=1.0, seed=3).train()
    a = noisy.teacher_targets(zt, privacy)
    assert torch.allclose(a[0, 0], torch.log_softmax(zt[0, 0], -1), atol=1e-6)  # a public token: untouched
    assert not torch.allclose(a[0, 1], torch.log_softmax(zt[0, 1] / 4.0, -1), atol=1e-3)
    again = SwingDistillationLoss(noise=1.0, seed=3).train()
    assert torch.equal(a, again.teacher_targets(zt, privacy))  # seeded: the same draws
    zs = torch.randn(1, 3, 5)
    m = torch.ones(1, 3, dtype=torch.bool)
    assert torch.allclose(term(zs, zt, privacy, m), kl(log_t, torch.log_softmax(zs, -1)).mean(), atol=1e-6)


def test_canaries_are_inserted_into_the_training_text_only():
    plain = text_corpus(TOK, seq_len=64)
    with_canary = text_corpus(TOK, seq_len=64, canaries=[{"text": "my PIN is 4071", "repeats": 5}])
    tok = with_canary.tokenizer
    count = lambda f: tok.decode(f["input_ids"].flatten().tolist()).count("my PIN is 4071")  # noqa: E731
    assert count(with_canary.train) == 5 and count(plain.train) == 0
    assert torch.equal(with_canary.test["input_ids"], plain.test["input_ids"])


class _Memoriser(torch.nn.Module):
    """A 'model' that strongly predicts one token sequence (the secret's tokens) and is uniform elsewhere."""

    def __init__(self, ids, vocab):
        super().__init__()
        self.ids, self.vocab = ids, vocab

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        for pos, tok in enumerate(self.ids[1:]):
            logits[:, pos, tok] = 10.0
        return type("Out", (), {"logits": logits})()


def test_exposure_is_full_for_a_memorised_secret_and_small_for_an_unseen_one():
    tok = train_tokenizer(vocab_size=300)
    ids = tok("PIN 407", add_special_tokens=False)["input_ids"]
    model = _Memoriser(ids, len(tok))
    got = exposure(model, tok, "PIN {secret}", "407", torch.device("cpu"))
    assert got["rank"] == 1 and got["exposure"] == pytest.approx(math.log2(1000))
    other = _Memoriser(tok("PIN 123", add_special_tokens=False)["input_ids"], len(tok))  # memorised another number
    elsewhere = exposure(other, tok, "PIN {secret}", "407", torch.device("cpu"))
    assert elsewhere["rank"] > 1 and elsewhere["exposure"] < got["exposure"]
    from kdrun.errors import KdrunError

    with pytest.raises(KdrunError, match="\\{secret\\}"):
        exposure(model, tok, "PIN", "407", torch.device("cpu"))
    with pytest.raises(KdrunError, match="at most 5 digits"):
        exposure(model, tok, "PIN {secret}", "1234567", torch.device("cpu"))
