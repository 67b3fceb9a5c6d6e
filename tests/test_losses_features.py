"""HintLoss, ATLoss, NSTLoss and FSPLoss on tiny feature maps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses.features import ATLoss, FSPLoss, HintLoss, NSTLoss


def _maps(*shape, seed=0, relu=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x.clamp(min=0) if relu else x


def _assert_student_grad_only(loss_fn, student, teacher):
    if isinstance(student, list):
        student = [s.clone().float().requires_grad_(True) for s in student]
        teacher = [t.clone().float() for t in teacher]
        leaves = student
    else:
        student = student.clone().float().requires_grad_(True)
        teacher = teacher.clone().float()
        leaves = [student]
    out = loss_fn(student, teacher)
    total = sum(out.values()) if isinstance(out, dict) else out
    assert total.dim() == 0 and torch.isfinite(total)
    total.backward()
    for t in teacher if isinstance(teacher, list) else [teacher]:
        assert t.grad is None and not t.requires_grad
    for s in leaves:
        assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- FitNets hint
def test_hint_by_hand():
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.tensor([[[[1.0, 0.0], [3.0, 8.0]]]])
    assert HintLoss()(s, t).item() == pytest.approx((0 + 4 + 0 + 16) / 4)
    assert HintLoss()(t, t).item() == 0.0
    _assert_student_grad_only(HintLoss(), _maps(2, 3, 4, 4), _maps(2, 3, 4, 4, seed=1))
    with pytest.raises(ValueError, match="hint.*student.*teacher"):
        HintLoss().check_shapes(student=torch.Size([2, 3, 4, 4]), teacher=torch.Size([2, 6, 4, 4]))


# ----------------------------------------------------------------------------- AT
def _at_by_loops(fs, ft):
    b, _, h, w = fs.shape
    total = 0.0
    for i in range(b):
        qs = [sum(fs[i, c, y, x].item() ** 2 for c in range(fs.shape[1])) / fs.shape[1] for y in range(h) for x in range(w)]
        qt = [sum(ft[i, c, y, x].item() ** 2 for c in range(ft.shape[1])) / ft.shape[1] for y in range(h) for x in range(w)]
        ns, nt = math.sqrt(sum(v * v for v in qs)), math.sqrt(sum(v * v for v in qt))
        total += sum((a / ns - c / nt) ** 2 for a, c in zip(qs, qt))
    return total / (b * h * w)


def test_at_by_hand():
    s = torch.tensor([[[[1.0, 0.0]]]])  # attention (1, 0)
    t = torch.tensor([[[[0.0, 3.0]]]])  # attention (0, 1) after normalisation
    assert ATLoss()(s, t).item() == pytest.approx(1.0)  # mean of (1 - 0)^2 and (0 - 1)^2


def test_at_matches_loops_sums_pairs_and_pools():
    s1, t1 = _maps(3, 2, 3, 3, seed=1), _maps(3, 5, 3, 3, seed=2)  # channel counts may differ
    s2, t2 = _maps(3, 4, 4, 4, seed=3), _maps(3, 4, 2, 2, seed=4)  # student map is larger
    at = ATLoss()
    assert at(s1, t1).item() == pytest.approx(_at_by_loops(s1, t1), rel=1e-9)
    pooled = F.avg_pool2d(s2, 2)  # 4x4 -> 2x2, what adaptive pooling does here
    assert at(s2, t2).item() == pytest.approx(_at_by_loops(pooled, t2), rel=1e-9)
    assert at([s1, s2], [t1, t2]).item() == pytest.approx(at(s1, t1).item() + at(s2, t2).item(), rel=1e-12)


def test_at_zero_scale_invariant_grad_and_checks():
    s, t = _maps(2, 3, 4, 4, seed=5), _maps(2, 6, 4, 4, seed=6)
    at = ATLoss()
    assert at(s, s.clone()).item() == pytest.approx(0.0, abs=1e-15)
    assert at(5.0 * s, t).item() == pytest.approx(at(s, t).item(), rel=1e-9)
    _assert_student_grad_only(at, [s, _maps(2, 3, 2, 2, seed=7)], [t, _maps(2, 6, 2, 2, seed=8)])
    low = at(s.bfloat16(), t.bfloat16())
    assert low.dtype == torch.float32 and low.item() == pytest.approx(at(s, t).item(), rel=5e-2)
    at.check_shapes(student=[torch.Size([2, 3, 4, 4])], teacher=[torch.Size([2, 6, 8, 8])])
    with pytest.raises(ValueError, match="AT.*same number"):
        at.check_shapes(student=[torch.Size([2, 3, 4, 4])] * 2, teacher=[torch.Size([2, 3, 4, 4])])
    with pytest.raises(ValueError, match="AT.*4-D"):
        at.check_shapes(student=torch.Size([2, 3]), teacher=torch.Size([2, 3]))
    with pytest.raises(ValueError, match="AT.*batch"):
        at.check_shapes(student=torch.Size([2, 3, 4, 4]), teacher=torch.Size([3, 3, 4, 4]))


# ----------------------------------------------------------------------------- NST
def _nst_by_loops(fs, ft):
    def chans(f, i):
        out = []
        for c in range(f.shape[1]):
            v = f[i, c].flatten().tolist()
            n = math.sqrt(sum(x * x for x in v))
            out.append([x / n for x in v])
        return out

    def kmean(a, b):
        return sum(sum(x * y for x, y in zip(u, v)) ** 2 for u in a for v in b) / (len(a) * len(b))

    total = 0.0
    for i in range(fs.shape[0]):
        cs, ct = chans(fs, i), chans(ft, i)
        total += kmean(ct, ct) + kmean(cs, cs) - 2 * kmean(cs, ct)
    return total / fs.shape[0]


def test_nst_by_hand_and_loops():
    s = torch.tensor([[[[1.0, 0.0]]]])
    t = torch.tensor([[[[0.0, 2.0]]]])
    assert NSTLoss()(s, t).item() == pytest.approx(2.0)  # k(t,t) + k(s,s) - 2 k(s,t) = 1 + 1 - 0
    fs, ft = _maps(3, 2, 2, 3, seed=9), _maps(3, 4, 2, 3, seed=10)
    nst = NSTLoss()
    assert nst(fs, ft).item() == pytest.approx(_nst_by_loops(fs, ft), rel=1e-9)
    big = _maps(3, 4, 4, 6, seed=11)
    assert nst([fs, fs], [ft, big]).item() == pytest.approx(
        _nst_by_loops(fs, ft) + _nst_by_loops(fs, F.avg_pool2d(big, 2)), rel=1e-9)


def test_nst_zero_grad_checks():
    fs, ft = _maps(2, 3, 3, 3, seed=12), _maps(2, 5, 3, 3, seed=13)
    nst = NSTLoss()
    assert nst(fs, fs.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert nst(fs * 3.0, ft).item() == pytest.approx(nst(fs, ft).item(), rel=1e-9)
    _assert_student_grad_only(nst, fs, ft)
    with pytest.raises(ValueError, match="NST"):
        nst.check_shapes(student=[torch.Size([2, 3, 3, 3])], teacher=[torch.Size([2, 3, 3, 3])] * 2)


# ----------------------------------------------------------------------------- FSP
def _fsp_by_loops(feats):
    mats = []
    for low, high in zip(feats[:-1], feats[1:]):
        if low.shape[-1] != high.shape[-1]:
            k = low.shape[-1] // high.shape[-1]
            low = F.avg_pool2d(low, k)
        b, c1, h, w = low.shape
        c2 = high.shape[1]
        m = torch.zeros(b, c2, c1, dtype=torch.float64)
        for i in range(b):
            for j in range(c2):
                for k in range(c1):
                    m[i, j, k] = (high[i, j] * low[i, k]).sum() / (h * w)
        mats.append(m)
    return mats


def test_fsp_matches_loops():
    s = [_maps(2, 2, 4, 4, seed=14), _maps(2, 3, 4, 4, seed=15), _maps(2, 3, 2, 2, seed=16)]
    t = [_maps(2, 2, 4, 4, seed=17), _maps(2, 3, 4, 4, seed=18), _maps(2, 3, 2, 2, seed=19)]
    expected = sum(((a - b) ** 2).mean().item() for a, b in zip(_fsp_by_loops(s), _fsp_by_loops(t)))
    assert FSPLoss()(s, t).item() == pytest.approx(expected, rel=1e-9)


def test_fsp_by_hand():
    low = torch.tensor([[[[1.0, 2.0]]]])     # one channel, 1x2
    high = torch.tensor([[[[3.0, 4.0]]]])
    # G = mean(3*1, 4*2) = 5.5 for the student; teacher uses (1, 2) and (1, 1): G = 1.5
    t_high = torch.tensor([[[[1.0, 1.0]]]])
    assert FSPLoss()([low, high], [low, t_high]).item() == pytest.approx((5.5 - 1.5) ** 2)


def test_fsp_zero_grad_checks():
    s = [_maps(2, 2, 4, 4, seed=20), _maps(2, 3, 2, 2, seed=21)]
    t = [_maps(2, 2, 8, 8, seed=22), _maps(2, 3, 4, 4, seed=23)]  # spatial sizes may differ
    fsp = FSPLoss()
    assert fsp(s, [x.clone() for x in s]).item() == pytest.approx(0.0, abs=1e-15)
    _assert_student_grad_only(fsp, s, t)
    fsp.check_shapes(student=[x.shape for x in s], teacher=[x.shape for x in t])
    with pytest.raises(ValueError, match=r"FSP: map 1 has 3 student channels.*\(2, 3, 2, 2\).*4 teacher"):
        fsp.check_shapes(student=[torch.Size([2, 2, 4, 4]), torch.Size([2, 3, 2, 2])],
                         teacher=[torch.Size([2, 2, 4, 4]), torch.Size([2, 4, 2, 2])])
    with pytest.raises(ValueError, match="at least 2"):
        fsp.check_shapes(student=[torch.Size([2, 2, 4, 4])], teacher=[torch.Size([2, 2, 4, 4])])
    with pytest.raises(ValueError, match="same number"):
        fsp.check_shapes(student=[torch.Size([2, 2, 4, 4])] * 3, teacher=[torch.Size([2, 2, 4, 4])] * 2)
