"""Preference pairs: the data keep each pair's two rows together; REDI, DPO (teacher reference) and the router
term against their formulas."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from kdrun.data.tensors import TensorLoader
from kdrun.data.text import preference_pairs
from kdrun.errors import KdrunError
from kdrun.losses import DPOLoss, ModelOutputLoss, REDILoss
from kdrun.losses.preference import sequence_log_probs

TOK = {"train": {"corpus": "pydoc_topics", "vocab_size": 300}}


def _pairs(tmp_path, n=12):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": f"Perhaps {2 * i + 1}, or more."}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_pairs_are_adjacent_rows_chosen_first(tmp_path):
    splits = preference_pairs(TOK, _pairs(tmp_path), test_fraction=0.25)
    f, tok = splits.train, splits.tokenizer
    assert splits.group == 2 and f["input_ids"].shape[0] == 2 * 9
    assert f["chosen"].tolist() == [True, False] * 9
    for i in range(0, 6, 2):
        c = tok.decode(f["labels"][i][f["token_mask"][i]].tolist())
        r = tok.decode(f["labels"][i + 1][f["token_mask"][i + 1]].tolist())
        assert c.startswith("It is") and r.startswith("Perhaps")
        assert torch.equal(f["input_ids"][i][:int(f["prompt_length"][i])], f["input_ids"][i + 1][:int(f["prompt_length"][i + 1])])
    assert not f["chosen_token_mask"][1::2].any() and torch.equal(f["chosen_token_mask"][0::2], f["token_mask"][0::2])
    assert torch.equal(f["rejected_token_mask"] | f["chosen_token_mask"], f["token_mask"])
    assert not (f["rejected_token_mask"] & f["chosen_token_mask"]).any()


@pytest.mark.parametrize("world", [1, 2])
def test_loader_never_splits_a_pair(tmp_path, world):
    f = preference_pairs(TOK, _pairs(tmp_path, 20), test_fraction=0.1).train
    n = f["input_ids"].shape[0]
    seen = []
    for rank in range(world):
        loader = TensorLoader(f, batch_size=6, train=True, device=torch.device("cpu"), seed=3, rank=rank, world_size=world,
                              trim_field="attention_mask", group=2)
        for i, batch in enumerate(loader):
            idx = batch["index"]
            assert idx.numel() == loader.rank_sizes(i)[rank]
            assert (idx[0::2] % 2 == 0).all() and torch.equal(idx[1::2], idx[0::2] + 1)  # chosen, then its rejected
            assert batch["chosen"].tolist() == [True, False] * (idx.numel() // 2)
            seen += idx.tolist()
    assert sorted(seen) == list(range(n))
    with pytest.raises(KdrunError, match="multiple of 2"):
        TensorLoader(f, batch_size=5, train=True, device=torch.device("cpu"), group=2)


def test_a_choice_of_rows_is_refused(tmp_path):
    splits = preference_pairs(TOK, _pairs(tmp_path))
    with pytest.raises(KdrunError, match="data.subset"):
        splits.subset(4)


def _logp(z, y, m):
    return (F.log_softmax(z.double(), -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1) * m).sum(-1)


def test_sequence_log_probs_sum_the_response_tokens():
    torch.manual_seed(0)
    z, y = torch.randn(5, 7, 11), torch.randint(0, 11, (5, 7))
    m = torch.rand(5, 7) > 0.4
    assert torch.allclose(sequence_log_probs(z, y, m, chunk_rows=2).double(), _logp(z, y, m), atol=1e-5)


def _batch():
    torch.manual_seed(1)
    z = torch.randn(4, 6, 9, requires_grad=True)
    ref = torch.randn(4, 6, 9)
    y = torch.randint(0, 9, (4, 6))
    m = torch.zeros(4, 6, dtype=torch.bool)
    m[0, 2:5] = m[1, 1:6] = m[2, 3:4] = m[3, 2:6] = True
    chosen = torch.tensor([True, False, True, False])
    return z, ref, y, m, chosen


def test_redi_is_the_length_normalised_asymmetric_objective():
    z, _, y, m, chosen = _batch()
    lp = _logp(z, y, m) / m.sum(-1)
    want = ((-1.0 * lp[0] + 0.8 * lp[1]) + (-1.0 * lp[2] + 0.8 * lp[3])) / 2
    got = REDILoss()(z, y, m, chosen)
    assert torch.allclose(got.double(), want, atol=1e-5)
    got.backward()
    assert z.grad[0, 0].abs().sum() == 0 and z.grad[0, 2].abs().sum() > 0


def test_dpo_with_a_teacher_reference_is_the_logistic_loss_of_the_margin():
    z, ref, y, m, chosen = _batch()
    pi, r = _logp(z, y, m), _logp(ref, y, m)
    margins = torch.stack([(pi[0] - r[0]) - (pi[1] - r[1]), (pi[2] - r[2]) - (pi[3] - r[3])])
    want = -F.logsigmoid(0.1 * margins).mean()
    got = DPOLoss(beta=0.1)(z, ref, y, m, chosen)
    assert torch.allclose(got.double(), want, atol=1e-5)
    # at the reference itself the loss is log 2
    assert torch.allclose(DPOLoss()(ref, ref, y, m, chosen), torch.tensor(0.6931472), atol=1e-5)


def test_pair_terms_name_bad_shapes():
    with pytest.raises(ValueError, match="even number of rows"):
        REDILoss().check_shapes(logits=torch.Size([3, 4, 5]), target=torch.Size([3, 4]), mask=torch.Size([3, 4]),
                                chosen=torch.Size([3]))
    with pytest.raises(ValueError, match="'reference' logits"):
        DPOLoss().check_shapes(logits=torch.Size([2, 4, 5]), reference=torch.Size([2, 4, 7]), target=torch.Size([2, 4]),
                               mask=torch.Size([2, 4]), chosen=torch.Size([2]))


def test_router_term_reads_the_models_own_aux_loss():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("mixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=50,
                               output_router_logits=True)
    out = AutoModelForCausalLM.from_config(cfg)(input_ids=torch.randint(0, 50, (2, 5)))
    assert torch.equal(ModelOutputLoss()(out.aux_loss), out.aux_loss.float())


def test_adpa_is_the_expected_advantage_of_the_aligned_over_the_reference_teacher():
    from kdrun.losses import AdvantageDistillationLoss

    torch.manual_seed(3)
    zs, za, zr = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    m = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    adv = F.log_softmax(za, -1) - F.log_softmax(zr, -1)
    per = -(F.softmax(zs, -1) * adv).sum(-1)
    want = (per * m).sum() / m.sum()
    got = AdvantageDistillationLoss(chunk_size=3)(zs, za, zr, m)
    assert torch.allclose(got, want, atol=1e-6)
    # the same teacher as aligned and reference: no advantage, no signal
    assert AdvantageDistillationLoss()(zs, za, za, m).abs().item() < 1e-6


def _cached(za, zr, k):
    """The two-teacher cache fields of aligned logits ``za`` and reference ``zr`` at the aligned top-k."""
    from kdrun.losses.tokens import _log1mexp

    la, lr = F.log_softmax(za, -1), F.log_softmax(zr, -1)
    top = la.topk(k, dim=-1)
    ref = lr.gather(-1, top.indices)
    return (top.indices, top.values, _log1mexp(torch.logsumexp(top.values, -1)), ref,
            _log1mexp(torch.logsumexp(ref, -1)))


def test_cached_adpa_is_the_live_term_at_full_vocabulary_and_the_bucket_formula_below():
    from kdrun.losses import AdvantageDistillationLoss, CachedAdvantageLoss

    torch.manual_seed(4)
    zs, za, zr = torch.randn(2, 4, 6, requires_grad=True), torch.randn(2, 4, 6), torch.randn(2, 4, 6)
    m = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    live = AdvantageDistillationLoss()(zs, za, zr, m)
    full = CachedAdvantageLoss(chunk_size=3)(zs, *_cached(za, zr, 6), m)
    assert torch.allclose(full, live, atol=1e-5)
    (g1,), (g2,) = torch.autograd.grad(full, zs), torch.autograd.grad(live, zs)
    assert torch.allclose(g1, g2, atol=1e-5)
    # K = 2: the two cached tokens' advantages, and the rest of the vocabulary as one bucket on both sides
    ids, la, ta, lr, tr = _cached(za, zr, 2)
    q = F.softmax(zs, -1)
    q_top = q.gather(-1, ids)
    q_tail = 1 - q_top.sum(-1)
    per = -((q_top * (la - lr)).sum(-1) + q_tail * (ta - tr))
    want = (per * m).sum() / m.sum()
    got = CachedAdvantageLoss()(zs, ids, la, ta, lr, tr, m)
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, live, atol=1e-3)


def test_a_two_teacher_cache_is_read_beside_the_first_and_its_reference_checkpoint_checked(tmp_path):
    import torch as _t

    from kdrun.cache import write_cache
    from kdrun.config import validate
    from kdrun.data.teacher_cache import open_cache
    from kdrun.build import load_data
    from kdrun.schema import experiment_config
    from tests.conftest import compose_cfg
    from tests.test_recipes import smoke_overrides

    overrides = smoke_overrides("qwen25_adpa")
    cfg = validate(compose_cfg(overrides, recipe="qwen25_adpa"))
    _t.manual_seed(0)
    info = write_cache(cfg, "teacher", tmp_path / "c", k=4, dtype="float32", mask_field="rejected_token_mask",
                       reference="reference")
    assert info["reference"]["model"] == "reference"
    exp_cfg = experiment_config(cfg)
    data = load_data(exp_cfg)
    cache = open_cache(str(tmp_path / "c"), data, exp_cfg)
    fields = cache.read(_t.arange(4), data.train["input_ids"].shape[1], "cpu")
    assert {"cache_ref_logp", "cache_ref_tail"} <= set(fields)
    scored = data.train["rejected_token_mask"][:4] != 0
    assert fields["cache_ref_logp"].shape == fields["cache_logp"].shape
    # stored where the student's responses are scored, and a log-probability there
    assert bool((fields["cache_ref_logp"][scored] <= 0).all()) and bool((fields["cache_ref_logp"][~scored] == 0).all())
    # the run's reference has other weights than the cached one: refused, naming it
    ckpt = tmp_path / "ref.pt"
    _t.save({"model": {}}, ckpt)
    bad = experiment_config(validate(compose_cfg([*overrides, f"models.reference.checkpoint={ckpt}"], recipe="qwen25_adpa")))
    with pytest.raises(KdrunError, match="reference checkpoint"):
        open_cache(str(tmp_path / "c"), data, bad)
