"""Ranking distillation: triples as adjacent rows, Margin-MSE and pairwise accuracy against their formulas, the
bi-encoder's score, and a score cache written by kdrun-cache --scores and checked against the run."""
from __future__ import annotations

import json

import pytest
import torch

from kdrun.data.text import ranking_pairs
from kdrun.errors import KdrunError
from kdrun.losses import MarginMSELoss, PairwiseRankingAccuracy

TOK = {"train": {"corpus": "pydoc_topics", "vocab_size": 300}}


def _triples(tmp_path, n=10):
    path = tmp_path / "triples.jsonl"
    rows = [{"query": f"what is {i} squared", "positive": f"{i} squared is {i * i}", "negative": f"the colour of {i}",
             "pos_score": 2.0 + i, "neg_score": -1.0 * i} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_triples_become_adjacent_rows_with_both_encodings(tmp_path):
    s = ranking_pairs(TOK, _triples(tmp_path), score_fields=["pos_score", "neg_score"], test_fraction=0.2,
                      max_length=24, query_max_length=8, passage_max_length=12)
    f, tok = s.train, s.tokenizer
    assert s.group == 2 and f["positive"].tolist() == [True, False] * 8
    assert f["input_ids"].shape[1] == 24 and f["query_input_ids"].shape[1] == 8 and f["passage_input_ids"].shape[1] == 12
    q0 = tok.decode(f["query_input_ids"][0][f["query_attention_mask"][0].bool()].tolist())
    assert q0 == tok.decode(f["query_input_ids"][1][f["query_attention_mask"][1].bool()].tolist())  # one query per pair
    assert "squared is" in tok.decode(f["passage_input_ids"][0].tolist()) and "colour" in tok.decode(f["passage_input_ids"][1].tolist())
    scores = f["teacher_score"].view(-1, 2)
    assert bool((scores[:, 0] >= 2.0).all()) and bool((scores[:, 1] <= 0.0).all())
    with pytest.raises(KdrunError, match="score_fields"):
        ranking_pairs(TOK, _triples(tmp_path), score_fields=["pos_score"])


def test_margin_mse_and_pairwise_accuracy_by_hand():
    s = torch.tensor([[2.0], [0.5], [1.0], [3.0]], requires_grad=True)
    t = torch.tensor([4.0, 1.0, 0.0, 1.0])
    pos = torch.tensor([True, False, True, False])
    want = ((2.0 - 0.5) - (4.0 - 1.0)) ** 2 / 2 + ((1.0 - 3.0) - (0.0 - 1.0)) ** 2 / 2
    got = MarginMSELoss()(s, t, pos)
    assert torch.isclose(got, torch.tensor(want))
    got.backward()
    assert torch.allclose(s.grad.view(-1), torch.tensor([-1.5, 1.5, -1.0, 1.0]))  # d/ds of the margins' errors
    assert PairwiseRankingAccuracy()(s, pos).item() == 0.5
    # the order inside a pair does not matter: the positive flag does
    assert torch.isclose(MarginMSELoss()(s.detach()[[1, 0, 3, 2]], t[[1, 0, 3, 2]], pos[[1, 0, 3, 2]]), got.detach())
    with pytest.raises(ValueError, match="one score per row"):
        MarginMSELoss().check_shapes(student=torch.Size([4, 2]), teacher=torch.Size([4]), positive=torch.Size([4]))


def test_the_bi_encoder_scores_by_the_dot_product_of_cls_vectors():
    from kdrun.models.hf import dot_encoder

    model = dot_encoder(config={"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
                                "intermediate_size": 32, "vocab_size": 50}).eval()
    q, d = torch.randint(0, 50, (3, 5)), torch.randint(0, 50, (3, 7))
    qm, dm = torch.ones_like(q), torch.ones_like(d)
    out = model(q, qm, d, dm)["logits"]
    cq = model.encoder(input_ids=q, attention_mask=qm).last_hidden_state[:, 0]
    cd = model.encoder(input_ids=d, attention_mask=dm).last_hidden_state[:, 0]
    assert out.shape == (3, 1) and torch.allclose(out[:, 0], (cq * cd).sum(-1), atol=1e-6)


def test_a_score_cache_feeds_margin_mse_without_the_teacher(tmp_path):
    from kdrun.cache import write_scores
    from kdrun.config import validate
    from kdrun.engine import run
    from tests.conftest import compose_cfg
    from tests.test_recipes import smoke_overrides

    torch.manual_seed(0)
    overrides = smoke_overrides("msmarco_margin_mse")
    info = write_scores(validate(compose_cfg(overrides, recipe="msmarco_margin_mse")), "teacher", tmp_path / "scores")
    cached = __import__("numpy").load(tmp_path / "scores" / "scores.npy")
    assert info["kind"] == "scores" and cached.shape == (info["samples"], 1)
    cached_run = overrides + [f"data.teacher_cache={tmp_path / 'scores'}", "loss.margin_mse.inputs.teacher=batch.cache_scores"]
    with pytest.raises(KdrunError, match="covers the training split only"):  # the monitor runs on the test split
        run(validate(compose_cfg(cached_run, recipe="msmarco_margin_mse")), tmp_path / "first")
    cfg = validate(compose_cfg(cached_run + ["trainer.monitor=[pair_accuracy]"], recipe="msmarco_margin_mse"))
    summary = run(cfg, tmp_path / "run")
    assert summary["steps"] >= 1 and "teacher" not in summary.get("frozen_top1", {})
    # another training split is refused by name
    bad = compose_cfg(overrides + [f"data.teacher_cache={tmp_path / 'scores'}", "data.source.max_length=12"],
                      recipe="msmarco_margin_mse")
    with pytest.raises(KdrunError, match="dataset_sha256"):
        run(validate(bad), tmp_path / "bad")
