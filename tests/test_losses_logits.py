"""DKDLoss and DISTLoss (and their relation to KDLoss) on tiny logits."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses.logits import DISTLoss, DKDLoss, KDLoss, standardize_logits


def _total(out):
    return sum(out.values()) if isinstance(out, dict) else out


def _logits(b=3, c=5, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, c, generator=g, dtype=torch.float64) * scale,
            torch.randn(b, c, generator=g, dtype=torch.float64) * scale)


# ----------------------------------------------------------------------------- DKD reference by loops
def _dkd_by_loops(s, t, y, alpha, beta, temp):
    tckd = nckd = 0.0
    for i in range(s.shape[0]):
        ps = [math.exp(v / temp) for v in s[i].tolist()]
        pt = [math.exp(v / temp) for v in t[i].tolist()]
        zs, zt = sum(ps), sum(pt)
        ps, pt = [v / zs for v in ps], [v / zt for v in pt]
        k = int(y[i])
        bs, bt = [ps[k], 1 - ps[k]], [pt[k], 1 - pt[k]]
        tckd += sum(q * math.log(q / p) for q, p in zip(bt, bs))
        others = [j for j in range(len(ps)) if j != k]
        ns = [ps[j] / (1 - ps[k]) for j in others]
        nt = [pt[j] / (1 - pt[k]) for j in others]
        nckd += sum(q * math.log(q / p) for q, p in zip(nt, ns))
    n = s.shape[0]
    return alpha * temp**2 * tckd / n, beta * temp**2 * nckd / n


def _dkd_mdistiller_style(s, t, y, alpha, beta, temp):
    """The reference code's formulation: masked sums of probabilities, -1000 on the target logit."""
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    ps, pt = F.softmax(s / temp, 1), F.softmax(t / temp, 1)
    bs = torch.stack([(ps * gt).sum(1), (ps * (1 - gt)).sum(1)], 1)
    bt = torch.stack([(pt * gt).sum(1), (pt * (1 - gt)).sum(1)], 1)
    tckd = F.kl_div(torch.log(bs), bt, reduction="sum") * temp**2 / s.shape[0]
    ns = F.log_softmax(s / temp - 1000.0 * gt, 1)
    nt = F.softmax(t / temp - 1000.0 * gt, 1)
    nckd = F.kl_div(ns, nt, reduction="sum") * temp**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def test_dkd_matches_explicit_loops():
    s, t = _logits()
    y = torch.tensor([0, 4, 2])
    out = DKDLoss(alpha=1.5, beta=8.0, temperature=4.0)(s, t, y)
    assert set(out) == {"tckd", "nckd"}
    tckd, nckd = _dkd_by_loops(s, t, y, 1.5, 8.0, 4.0)
    assert out["tckd"].item() == pytest.approx(tckd, rel=1e-6)
    assert out["nckd"].item() == pytest.approx(nckd, rel=1e-6)
    ref = _dkd_mdistiller_style(s, t, y, 1.5, 8.0, 4.0)
    assert _total(out).item() == pytest.approx(ref.item(), rel=1e-5)


def test_dkd_decomposition_of_kd():
    """KD = TCKD + (1 - p_t^teacher) * NCKD, per sample (Zhao et al., Eq. 3)."""
    s, t = _logits(b=3, c=6, seed=1)
    y = torch.tensor([1, 5, 0])
    temp = 3.0
    dkd, kd = DKDLoss(alpha=1.0, beta=1.0, temperature=temp), KDLoss(temperature=temp)
    for i in range(3):
        si, ti, yi = s[i:i + 1], t[i:i + 1], y[i:i + 1]
        parts = dkd(si, ti, yi)
        p_target = F.softmax(ti / temp, 1)[0, yi].item()
        assert kd(si, ti).item() == pytest.approx(parts["tckd"].item() + (1 - p_target) * parts["nckd"].item(), rel=1e-6)
    # ... and therefore for the batch mean too
    p_t = F.softmax(t / temp, 1).gather(1, y[:, None]).squeeze(1)
    per = [dkd(s[i:i + 1], t[i:i + 1], y[i:i + 1]) for i in range(3)]
    combined = sum(p["tckd"] + (1 - p_t[i]) * p["nckd"] for i, p in enumerate(per)) / 3
    assert kd(s, t).item() == pytest.approx(combined.item(), rel=1e-6)


def test_dkd_zero_for_equal_logits_and_shift_invariant():
    s, _ = _logits()
    y = torch.tensor([0, 1, 2])
    assert _total(DKDLoss()(s, s.clone(), y)).item() == pytest.approx(0.0, abs=1e-10)
    s2, t2 = _logits(seed=3)
    base = _total(DKDLoss()(s2, t2, y)).item()
    shifted = _total(DKDLoss()(s2 + torch.tensor([[3.0], [-2.0], [7.0]], dtype=s2.dtype), t2 - 5.0, y)).item()
    assert shifted == pytest.approx(base, rel=1e-9)


def test_dkd_standardized_is_scale_invariant():
    s, t = _logits(seed=4)
    y = torch.tensor([2, 2, 0])
    loss = DKDLoss(temperature=2.0, standardize=True)
    base = _total(loss(s, t, y)).item()
    assert _total(loss(3.0 * s + 1.0, 0.5 * t - 4.0, y)).item() == pytest.approx(base, rel=1e-6)
    # standardisation is the same z-scoring KDLoss uses
    manual = _total(DKDLoss(temperature=2.0)(standardize_logits(s), standardize_logits(t), y)).item()
    assert base == pytest.approx(manual, rel=1e-9)


def test_dkd_gradient_reaches_student_only_and_is_finite_for_confident_teacher():
    s = torch.randn(4, 7, requires_grad=True)
    t = torch.randn(4, 7)
    t[:, 0] = 200.0  # teacher is certain: p_t rounds to 1 in float32
    y = torch.zeros(4, dtype=torch.long)
    y[1] = 3
    out = DKDLoss()(s, t, y)
    total = _total(out)
    assert torch.isfinite(total)
    total.backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_dkd_bf16_inputs_close_to_fp32():
    s, t = (x.float() for x in _logits(b=4, c=10, seed=5))
    y = torch.tensor([0, 9, 3, 3])
    ref = _total(DKDLoss()(s, t, y))
    low = _total(DKDLoss()(s.bfloat16(), t.bfloat16(), y))
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=5e-2)


def test_dkd_check_shapes():
    loss = DKDLoss()
    loss.check_shapes(student=torch.Size([8, 10]), teacher=torch.Size([8, 10]), target=torch.Size([8]))
    with pytest.raises(ValueError, match="DKD.*student.*teacher"):
        loss.check_shapes(student=torch.Size([8, 10]), teacher=torch.Size([8, 100]), target=torch.Size([8]))
    with pytest.raises(ValueError, match="target"):
        loss.check_shapes(student=torch.Size([8, 10]), teacher=torch.Size([8, 10]), target=torch.Size([8, 10]))
    with pytest.raises(ValueError, match="2 classes"):
        loss.check_shapes(student=torch.Size([8, 1]), teacher=torch.Size([8, 1]), target=torch.Size([8]))
    with pytest.raises(ValueError, match="temperature"):
        DKDLoss(temperature=0)


# ----------------------------------------------------------------------------- DIST
def _dist_by_loops(s, t, beta, gamma, tau):
    ys = F.softmax(s / tau, 1).tolist()
    yt = F.softmax(t / tau, 1).tolist()
    b, c = len(ys), len(ys[0])
    inter = 1 - sum(statistics.correlation(ys[i], yt[i]) for i in range(b)) / b
    cols = lambda m, j: [m[i][j] for i in range(b)]  # noqa: E731
    intra = 1 - sum(statistics.correlation(cols(ys, j), cols(yt, j)) for j in range(c)) / c
    return beta * tau**2 * inter, gamma * tau**2 * intra


def test_dist_matches_explicit_loops():
    s, t = _logits(b=3, c=4, seed=6)
    out = DISTLoss(beta=2.0, gamma=0.5, tau=4.0)(s, t)
    assert set(out) == {"inter", "intra"}
    inter, intra = _dist_by_loops(s, t, 2.0, 0.5, 4.0)
    assert out["inter"].item() == pytest.approx(inter, rel=1e-6)
    assert out["intra"].item() == pytest.approx(intra, rel=1e-6)


def test_dist_by_hand_two_classes():
    # two classes: every centred row is +-(a, -a), so the row correlation is +1 when student and
    # teacher favour the same class and -1 otherwise
    s = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    out = DISTLoss()(s, t)
    assert out["inter"].item() == pytest.approx(1 - (1 + -1) / 2, abs=1e-6)
    # columns over a batch of two are also +-(a, -a): column 0 of student goes down, of teacher up
    assert out["intra"].item() == pytest.approx(1 - (-1 + -1) / 2, abs=1e-6)


def test_dist_zero_for_equal_and_invariant_to_constant_shift():
    s, t = _logits(b=4, c=6, seed=7)
    # exactly 0 without the eps of the correlation's denominator; eps (1e-8, as the official code)
    # leaves a residue of order tau^2 * eps / ||centred softmax||^2
    assert _total(DISTLoss(tau=4.0, eps=0.0)(s, s.clone())).item() == pytest.approx(0.0, abs=1e-12)
    assert _total(DISTLoss(tau=4.0)(s, s.clone())).item() == pytest.approx(0.0, abs=1e-4)
    base = _total(DISTLoss(tau=4.0)(s, t)).item()
    assert _total(DISTLoss(tau=4.0)(s + 5.0, t - torch.arange(4.0, dtype=t.dtype)[:, None])).item() == pytest.approx(base, rel=1e-9)
    std = DISTLoss(tau=2.0, standardize=True)
    assert _total(std(2.0 * s, t + 1.0)).item() == pytest.approx(_total(std(s, t)).item(), rel=1e-6)


def test_dist_gradient_student_only_and_checks():
    s = torch.randn(5, 8, requires_grad=True)
    t = torch.randn(5, 8)
    total = _total(DISTLoss(tau=4.0)(s, t))
    total.backward()
    assert t.grad is None
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    low = _total(DISTLoss()(s.detach().bfloat16(), t.bfloat16()))
    assert low.item() == pytest.approx(_total(DISTLoss()(s.detach(), t)).item(), rel=5e-2)
    with pytest.raises(ValueError, match="DIST"):
        DISTLoss().check_shapes(student=torch.Size([5, 8]), teacher=torch.Size([5, 9]))
    with pytest.raises(ValueError, match="batch, classes"):
        DISTLoss().check_shapes(student=torch.Size([5, 8, 2]), teacher=torch.Size([5, 8, 2]))


# ------------------------------------------------------------------ reverse and balanced KL, MixSTD CE


def _kl_loop(p, q):
    """KL(p || q) of one pair of probability vectors, by an explicit sum."""
    return sum(float(pi) * (math.log(float(pi)) - math.log(float(qi))) for pi, qi in zip(p, q))


def test_reverse_kl_matches_explicit_sums():
    from kdrun.losses.logits import ReverseKLLoss

    torch.manual_seed(0)
    s, t = torch.randn(3, 5), torch.randn(3, 5)
    temp = 2.0
    ps, pt = F.softmax(s / temp, -1), F.softmax(t / temp, -1)
    expected = statistics.mean(_kl_loop(ps[i], pt[i]) for i in range(3)) * temp ** 2
    assert float(ReverseKLLoss(temperature=temp)(s, t)) == pytest.approx(expected, rel=1e-5)
    assert float(ReverseKLLoss()(s, s)) == pytest.approx(0.0, abs=1e-6)


def test_balanced_kl_weights_forward_and_reverse_by_the_entropy_gap():
    from kdrun.losses.logits import BalancedKLLoss

    torch.manual_seed(1)
    s, t = torch.randn(4, 6) * 2, torch.randn(4, 6)
    loss = BalancedKLLoss(temperature=1.0, tau=0.5)
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    terms = []
    for i in range(4):
        h_s = -sum(float(p) * math.log(float(p)) for p in ps[i])
        h_t = -sum(float(p) * math.log(float(p)) for p in pt[i])
        a = 1 / (1 + math.exp(-(h_t - h_s) / 0.5))
        terms.append(a * _kl_loop(pt[i], ps[i]) + (1 - a) * _kl_loop(ps[i], pt[i]))
    assert float(loss(s, t)) == pytest.approx(statistics.mean(terms), rel=1e-5)
    # a very confident student (low entropy) is weighted towards the forward KL, an unsure one to the reverse
    sharp, flat = torch.tensor([[10.0, 0, 0, 0]]), torch.tensor([[0.1, 0, 0, 0]])
    mid = torch.tensor([[2.0, 0, 0, 0]])
    assert float(BalancedKLLoss(tau=0.01).balance(sharp, mid)) > 0.99
    assert float(BalancedKLLoss(tau=0.01).balance(flat, mid)) < 0.01


def test_balanced_kl_weight_carries_no_gradient():
    from kdrun.losses.logits import BalancedKLLoss

    s = torch.randn(2, 5, requires_grad=True)
    t = torch.randn(2, 5)
    loss = BalancedKLLoss(tau=0.3)
    a = loss.balance(s, t)
    grad = torch.autograd.grad(loss(s, t), s)[0]
    ps, pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    fixed = (a * (pt.exp() * (pt - ps)).sum(-1) + (1 - a) * (ps.exp() * (ps - pt)).sum(-1)).mean()
    torch.testing.assert_close(grad, torch.autograd.grad(fixed, s)[0])


def test_cross_entropy_standardized_and_soft_targets():
    from kdrun.losses.logits import CrossEntropy

    torch.manual_seed(2)
    z = torch.randn(4, 5) * 3
    q = F.softmax(torch.randn(4, 5), -1)
    zs = z / z.std(-1, keepdim=True)
    expected = -(q * F.log_softmax(zs, -1)).sum(-1).mean()
    torch.testing.assert_close(CrossEntropy(standardize=True)(z, q), expected, rtol=1e-5, atol=1e-6)
    y = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(CrossEntropy()(z, F.one_hot(y, 5).float()), F.cross_entropy(z, y))


def _sinkhorn_reference(s, t, temperature=2.0, epsilon=0.1, iterations=20, scale=0.002):
    """The SinKD authors' loss: the direct Sinkhorn iteration on K = exp(-W / epsilon)."""
    import torch.nn.functional as F

    p_s, p_t = F.softmax(s / temperature, dim=1), F.softmax(t / temperature, dim=1)
    w = torch.cdist(p_s, p_t, p=1)
    k = torch.exp(-w / epsilon)
    for _ in range(iterations):
        k = k / k.sum(dim=1, keepdim=True)
        k = k / k.sum(dim=0, keepdim=True)
    return scale * (k * w).sum()


def test_sinkhorn_loss_matches_the_direct_iteration_and_its_gradient():
    from kdrun.losses import SinkhornLoss

    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 5, generator=g, dtype=torch.float64)
    term = SinkhornLoss()
    got = term(s, t)
    want = _sinkhorn_reference(s, t)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-9)
    g1, = torch.autograd.grad(got, s)
    g2, = torch.autograd.grad(want, s)
    torch.testing.assert_close(g1.double(), g2, rtol=1e-4, atol=1e-9)
    # batch-wise: identical predictions cost almost nothing, the plan is near the identity
    assert float(term(t, t)) < 0.1 * float(term(s.detach(), t))
    # the log-domain plan stays finite where exp(-W / epsilon) underflows
    tiny = SinkhornLoss(epsilon=1e-4)(s.detach() * 10, t * 10)
    assert torch.isfinite(tiny)
