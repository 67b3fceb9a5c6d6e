"""Token-level divergences, TAID and hidden-state losses against explicit per-token sums (masks and
padding included), the conventions of TRL and DistiLLM, chunking, and the memory that chunking saves."""
from __future__ import annotations

import math

import pytest
import torch

from kdrun.losses.tokens import (TAIDLoss, TokenCrossEntropy, TokenDivergence, TokenHiddenLoss, chunked_masked_sum,
                                 top_k_with_tail)

B, T, V = 3, 6, 13


@pytest.fixture()
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=g) > 0.35
    mask[:, -1] = False  # padding at the end of every sequence
    return s, t, mask


def _kl(a, b):
    return sum(a[v] * (math.log(a[v]) - math.log(b[v])) for v in range(len(a)))


def explicit(kind, s, t, mask, **kw):
    """The divergence as a plain Python sum over valid positions and vocabulary entries."""
    total, n = 0.0, 0
    for b in range(B):
        for i in range(T):
            if not mask[b, i]:
                continue
            p = torch.softmax(t[b, i].detach(), -1).tolist()
            q = torch.softmax(s[b, i].detach(), -1).tolist()
            if kind == "fkl":
                d = _kl(p, q)
            elif kind == "rkl":
                d = _kl(q, p)
            elif kind == "jsd":
                pi = kw["teacher_mix"]
                m = [pi * a + (1 - pi) * c for a, c in zip(p, q)]
                d = pi * _kl(p, m) + (1 - pi) * _kl(q, m)
            elif kind == "skl":
                a_ = kw["skew"]
                d = _kl(p, [a_ * a + (1 - a_) * c for a, c in zip(p, q)])
            elif kind == "srkl":
                a_ = kw["skew"]
                d = _kl(q, [a_ * c + (1 - a_) * a for a, c in zip(p, q)])
            elif kind == "tvd":
                d = 0.5 * sum(abs(a - c) for a, c in zip(p, q))
            total += d
            n += 1
    return total / n


CASES = [("fkl", {}), ("rkl", {}), ("jsd", {"teacher_mix": 0.3}), ("jsd", {"teacher_mix": 0.9}), ("skl", {"skew": 0.1}),
         ("srkl", {"skew": 0.1}), ("tvd", {})]


@pytest.mark.parametrize("kind,kw", CASES)
@pytest.mark.parametrize("chunk", [None, 4])
def test_divergence_equals_its_explicit_per_token_sum(logits, kind, kw, chunk):
    s, t, mask = logits
    value = TokenDivergence(kind=kind, chunk_size=chunk, **kw)(s, t, mask)
    assert value.item() == pytest.approx(explicit(kind, s, t, mask, **kw), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("kind,kw", CASES)
def test_chunked_gradients_equal_unchunked(logits, kind, kw):
    s, t, mask = logits
    g1 = torch.autograd.grad(TokenDivergence(kind=kind, chunk_size=None, **kw)(s, t, mask), s)[0]
    g2 = torch.autograd.grad(TokenDivergence(kind=kind, chunk_size=5, **kw)(s, t, mask), s)[0]
    assert torch.allclose(g1, g2, atol=1e-12)
    assert g1[~mask].abs().max() == 0  # masked positions get no gradient


def test_padding_and_masked_positions_do_not_count(logits):
    s, t, mask = logits
    base = TokenDivergence()(s, t, mask)
    s2, t2 = s.detach().clone(), t.clone()
    s2[~mask], t2[~mask] = 1e3, -1e3  # garbage where the mask is off
    assert TokenDivergence()(s2, t2, mask).item() == pytest.approx(base.item(), rel=1e-12)


def test_jsd_endpoints_and_skew_zero_are_the_kls(logits):
    s, t, mask = logits
    fkl, rkl = TokenDivergence("fkl")(s, t, mask), TokenDivergence("rkl")(s, t, mask)
    assert TokenDivergence("jsd", teacher_mix=0.0)(s, t, mask).item() == pytest.approx(fkl.item())
    assert TokenDivergence("jsd", teacher_mix=1.0)(s, t, mask).item() == pytest.approx(rkl.item())
    assert TokenDivergence("skl", skew=0.0)(s, t, mask).item() == pytest.approx(fkl.item())
    assert TokenDivergence("srkl", skew=0.0)(s, t, mask).item() == pytest.approx(rkl.item())


def test_jsd_matches_trl_beta_and_distillm_lambda_conventions(logits):
    """TRL: m = beta p + (1 - beta) q, loss beta KL(p||m) + (1 - beta) KL(q||m). DistiLLM: m = (1 - lam) p + lam q,
    loss lam KL(q||m) + (1 - lam) KL(p||m). kdrun's teacher_mix is TRL's beta and DistiLLM's 1 - lam."""
    s, t, mask = logits
    ls, lt = torch.log_softmax(s.detach(), -1), torch.log_softmax(t, -1)
    m_ = mask.double()

    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1)

    beta = 0.2
    m = torch.log(beta * lt.exp() + (1 - beta) * ls.exp())
    trl = ((beta * kl(lt, m) + (1 - beta) * kl(ls, m)) * m_).sum() / m_.sum()
    lam = 0.9
    m = torch.log((1 - lam) * lt.exp() + lam * ls.exp())
    distillm = ((lam * kl(ls, m) + (1 - lam) * kl(lt, m)) * m_).sum() / m_.sum()
    assert TokenDivergence("jsd", teacher_mix=beta)(s, t, mask).item() == pytest.approx(trl.item(), rel=1e-10)
    assert TokenDivergence("jsd", teacher_mix=1 - lam)(s, t, mask).item() == pytest.approx(distillm.item(), rel=1e-10)


def test_srkl_stop_grad_mixture_changes_only_the_gradient(logits):
    s, t, mask = logits
    a, b = TokenDivergence("srkl")(s, t, mask), TokenDivergence("srkl", stop_grad_mixture=True)(s, t, mask)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    ga, gb = torch.autograd.grad(a, s)[0], torch.autograd.grad(b, s)[0]
    assert (ga - gb).abs().max() > 1e-6


def test_top_k_with_tail_sums_to_one_and_equals_dense_at_full_support(logits):
    s, t, mask = logits
    ls, lt = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    a, b = top_k_with_tail(ls, lt, 4)
    assert torch.allclose(a.exp().sum(-1), torch.ones(B, T, dtype=a.dtype))
    assert torch.allclose(b.exp().sum(-1), torch.ones(B, T, dtype=b.dtype))
    for kind, kw in CASES:
        dense = TokenDivergence(kind, **kw)(s, t, mask)
        full = TokenDivergence(kind, top_k=V, **kw)(s, t, mask)  # the tail bucket is empty
        assert full.item() == pytest.approx(dense.item(), rel=1e-6, abs=1e-9), kind


def test_top_k_forward_kl_is_the_tail_bucket_formula(logits):
    s, t, mask = logits
    k = 3
    p, q = torch.softmax(t, -1), torch.softmax(s.detach(), -1)
    idx = p.topk(k, -1).indices
    ps, qs = p.gather(-1, idx), q.gather(-1, idx)
    pt, qt = 1 - ps.sum(-1), 1 - qs.sum(-1)
    per = (ps * (ps.log() - qs.log())).sum(-1) + pt * (pt.log() - qt.log())
    want = (per * mask).sum() / mask.sum()
    assert TokenDivergence("fkl", top_k=k)(s, t, mask).item() == pytest.approx(want.item(), rel=1e-8)


def test_temperature_and_t_squared(logits):
    s, t, mask = logits
    plain = TokenDivergence("fkl", temperature=2.0)(s, t, mask)
    want = explicit("fkl", s / 2, t / 2, mask)
    assert plain.item() == pytest.approx(want, rel=1e-10)
    assert TokenDivergence("fkl", temperature=2.0, t_squared=True)(s, t, mask).item() == pytest.approx(4 * want, rel=1e-10)


def test_vocabulary_mismatch_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="share one tokenizer"):
        TokenDivergence().check_shapes(student=torch.Size([2, 5, 100]), teacher=torch.Size([2, 5, 120]),
                                       mask=torch.Size([2, 5]))


def test_bad_arguments_are_refused():
    for kw in ({"kind": "xkl"}, {"temperature": 0}, {"teacher_mix": 1.5}, {"skew": 1.0}, {"top_k": 0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            TokenDivergence(**kw)


def test_token_cross_entropy_ignores_minus_100_and_chunks(logits):
    s, t, mask = logits
    y = torch.randint(0, V, (B, T))
    y[~mask] = -100
    want = torch.nn.functional.cross_entropy(s.detach()[mask], y[mask])
    for chunk in (None, 4):
        assert TokenCrossEntropy(chunk_size=chunk)(s, y, mask).item() == pytest.approx(want.item(), rel=1e-10)


def _saved_new_bytes(fn, inputs):
    """Bytes of the tensors autograd saves for backward that are not views of ``inputs`` (new memory)."""
    owned = {x.untyped_storage().data_ptr() for x in inputs}
    total = 0

    def pack(x):
        nonlocal total
        if x.untyped_storage().data_ptr() not in owned:
            total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return total


def test_chunked_memory_grows_with_the_chunk_not_the_sequence():
    vocab = 512
    sizes = {}
    for length in (64, 256):
        for chunk in (32, None):
            s = torch.randn(2, length, vocab, dtype=torch.bfloat16, requires_grad=True)
            t = torch.randn(2, length, vocab, dtype=torch.bfloat16)
            mask = torch.ones(2, length, dtype=torch.bool)
            term = TokenDivergence("fkl", chunk_size=chunk)
            sizes[length, chunk] = _saved_new_bytes(lambda: term(s, t, mask), [s, t, mask])
    fp32_logits = 2 * 64 * vocab * 4
    assert sizes[64, None] >= fp32_logits and sizes[256, None] >= 4 * fp32_logits  # naive: float32 (B, L, V) tensors
    # chunked: nothing with a vocabulary dimension is kept, only a few bytes per position (the mask as floats)
    assert sizes[256, 32] <= 8 * 2 * 256 and sizes[64, 32] <= 8 * 2 * 64
    assert sizes[256, None] > 100 * sizes[256, 32]


def test_chunked_masked_sum_matches_a_direct_sum():
    x = torch.randn(4, 7, 3, dtype=torch.float64)
    m = torch.rand(4, 7) > 0.5
    got = chunked_masked_sum(lambda r: r.pow(2).sum(-1), [x], m, 5)
    assert got.item() == pytest.approx((x.pow(2).sum(-1) * m).sum().item(), rel=1e-12)


def test_taid_target_and_update_rule(logits):
    s, t, mask = logits
    term = TAIDLoss(t_start=0.4, t_end=1.0, alpha=0.1, beta=0.5)
    term.train()
    term.on_step(0, 10)
    value = term(s, t, mask)
    tt = 0.4
    target = torch.softmax((1 - tt) * s.detach() + tt * t, -1)
    per = -(target * torch.log_softmax(s.detach(), -1)).sum(-1)
    assert value.item() == pytest.approx(((per * mask).sum() / mask.sum()).item(), rel=1e-6)  # t is a float32 buffer
    # step 1: no previous loss yet, so rel = 0, m = 0, delta = alpha * sigmoid(0) * (1 - t)
    term.on_step(1, 10)
    expected = max(0.4 + 0.6 * 1 / 10, 0.4 + 0.1 * 0.5 * 0.6)
    assert term.t.item() == pytest.approx(expected, rel=1e-6)
    l1 = value.item()
    # step 2: a lower loss raises the momentum
    value2 = term(s * 0.5, t, mask)
    term.on_step(2, 10)
    rel = (l1 - value2.item()) / l1
    m = 0.5 * 0.0 + 0.5 * rel
    t_prev = expected
    t_new = max(0.4 + 0.6 * 2 / 10, t_prev + 0.1 * (1 / (1 + math.exp(-m))) * (1 - t_prev))
    assert term.t.item() == pytest.approx(min(1.0, t_new), rel=1e-6)
    assert term.momentum.item() == pytest.approx(m, rel=1e-5)


def test_taid_floor_only_when_not_adaptive(logits):
    term = TAIDLoss(t_start=0.2, adaptive=False)
    for step in range(0, 11):
        term.on_step(step, 10)
        assert term.t.item() == pytest.approx(0.2 + 0.8 * step / 10, rel=1e-6)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_loss_over_a_layer_map(kind):
    g = torch.Generator().manual_seed(1)
    hs = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    ht = [torch.randn(2, 5, 8, generator=g) for _ in range(2)]
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    got = TokenHiddenLoss(kind)(hs, ht, mask)
    per_pair = []
    for a, b in zip(hs, ht):
        vals = []
        for i in range(2):
            for j in range(5):
                if mask[i, j]:
                    x, y = a[i, j], b[i, j]
                    vals.append(float(((x - y) ** 2).mean()) if kind == "mse"
                                else 1 - float(x @ y / (x.norm() * y.norm())))
        per_pair.append(sum(vals) / len(vals))
    assert got.item() == pytest.approx(sum(per_pair) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="Projector"):
        TokenHiddenLoss().check_shapes(student=[torch.Size([2, 5, 4])], teacher=[torch.Size([2, 5, 8])], mask=torch.Size([2, 5]))


def test_taid_for_classifiers_matches_its_formula_and_schedule():
    """TAIDClassifierLoss: -1/B sum_i sum_c softmax((1 - t) z_s + t z_t)_ic log softmax(z_s)_ic, the target
    detached; t moves once per step from the step's sample-weighted mean loss, as the token term does."""
    from kdrun.losses import TAIDClassifierLoss

    g = torch.Generator().manual_seed(0)
    zs = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    term = TAIDClassifierLoss(t_start=0.4, alpha=0.1, beta=0.5)
    loss = term(zs, zt)
    target = torch.softmax(0.6 * zs.detach() + 0.4 * zt, dim=1)
    want = -(target * torch.log_softmax(zs, dim=1)).sum(1).mean()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-7)
    # gradient only through log q: d/dz_s = (softmax(z_s) - p_t) / B
    grad, = torch.autograd.grad(loss, zs)
    torch.testing.assert_close(grad.double(), (torch.softmax(zs.detach(), 1) - target) / 6, rtol=1e-4, atol=1e-7)
    # two micro-batches of 2 and 4 samples: l is their sample-weighted mean
    term2 = TAIDClassifierLoss(t_start=0.4, alpha=0.1, beta=0.5)
    term2.on_step(0, 100)
    l1, l2 = term2(zs[:2].detach(), zt[:2]), term2(zs[2:].detach(), zt[2:])
    torch.testing.assert_close((term2.step_loss[0] / term2.step_loss[1]).double(), (2 * l1 + 4 * l2).double() / 6)
    term2.on_step(1, 100)  # first seen loss: rel = 0, m = 0, t += alpha * 0.5 * (1 - t)
    assert float(term2.t) == pytest.approx(0.4 + 0.1 * 0.5 * 0.6)
    assert float(term2.prev_loss) == pytest.approx(float((2 * l1 + 4 * l2) / 6))
    with pytest.raises(ValueError, match="mask"):
        term2.check_shapes(torch.Size([2, 3, 5]), torch.Size([2, 3, 5]))
