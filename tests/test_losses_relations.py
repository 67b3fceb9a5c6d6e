"""SPLoss, CCLoss, RKDLoss and PKTLoss on tiny batches."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdrun.losses.relations import CCLoss, PKTLoss, RKDLoss, SPLoss
from kdrun.component import BuildContext


def _feats(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _total(out):
    return sum(out.values()) if isinstance(out, dict) else out


def _assert_student_grad_only(loss_fn, student, teacher):
    student = student.clone().float().requires_grad_(True)
    teacher = teacher.clone().float()
    total = _total(loss_fn(student, teacher))
    assert total.dim() == 0 and torch.isfinite(total)
    total.backward()
    assert teacher.grad is None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- SP
def _sp_by_loops(fs, ft):
    b = fs.shape[0]
    fs, ft = fs.flatten(1).tolist(), ft.flatten(1).tolist()

    def gram(f):
        rows = [[sum(x * y for x, y in zip(f[i], f[j])) for j in range(b)] for i in range(b)]
        return [[v / math.sqrt(sum(u * u for u in r)) for v in r] for r in rows]

    gs, gt = gram(fs), gram(ft)
    return sum((gt[i][j] - gs[i][j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_sp_by_hand_and_loops():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert SPLoss()(s, t).item() == pytest.approx(1 - 1 / math.sqrt(2), rel=1e-6)
    fs, ft = _feats(3, 2, 2, 2, seed=1), _feats(3, 5, seed=2)  # widths may differ
    assert SPLoss()(fs, ft).item() == pytest.approx(_sp_by_loops(fs, ft), rel=1e-9)
    assert SPLoss()([fs, fs], [ft, fs]).item() == pytest.approx(_sp_by_loops(fs, ft), rel=1e-9)


def test_sp_zero_scale_invariant_grad_checks():
    fs, ft = _feats(4, 3, 2, 2, seed=3), _feats(4, 6, 2, 2, seed=4)
    sp = SPLoss()
    assert sp(fs, fs.clone()).item() == pytest.approx(0.0, abs=1e-15)
    assert sp(7.0 * fs, ft).item() == pytest.approx(sp(fs, ft).item(), rel=1e-9)
    _assert_student_grad_only(sp, fs, ft)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = sp(fs.float(), ft.float())
    assert low.dtype == torch.float32 and low.item() == pytest.approx(sp(fs, ft).item(), rel=1e-4)
    with pytest.raises(ValueError, match="SP.*batch"):
        sp.check_shapes(student=torch.Size([4, 3, 2, 2]), teacher=torch.Size([5, 3, 2, 2]))


# ----------------------------------------------------------------------------- CC
def test_cc_by_hand_without_heads():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    t = torch.tensor([[0.0, 0.0], [0.0, 8.0], [0.0, 0.0]])
    # |s - t| = (1, 2), (3, 4), (5, 6); consecutive products: 1*3 + 2*4 = 11, 3*5 + 4*6 = 39
    assert CCLoss(embed_dim=None)(s, t).item() == pytest.approx((11 + 39) / 2)
    assert CCLoss(embed_dim=None)(s, s.clone()).item() == 0.0
    assert CCLoss(embed_dim=None)(s[:1], t[:1]).item() == 0.0  # no consecutive pair


def test_cc_heads_created_in_setup():
    fs, ft = _feats(4, 6, seed=5).float(), _feats(4, 10, seed=6).float()
    cc = CCLoss()
    with pytest.raises(RuntimeError, match="setup"):
        cc(fs, ft)
    cc.setup(BuildContext(shapes={"student": fs.shape, "teacher": ft.shape}, num_train=100))
    assert {k.split(".")[0] for k in cc.state_dict()} == {"embed_s", "embed_t"}
    assert cc.embed_s.linear.weight.shape == (128, 6) and cc.embed_t.linear.weight.shape == (128, 10)
    es, et = cc.embed_s(fs), cc.embed_t(ft)
    expected = sum(((es[i] - et[i]).abs() * (es[i + 1] - et[i + 1]).abs()).sum() for i in range(3)) / 3
    assert cc(fs, ft).item() == pytest.approx(expected.item(), rel=1e-5)

    s = fs.clone().requires_grad_(True)
    cc(s, ft).backward()
    assert ft.grad is None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert cc.embed_s.linear.weight.grad.abs().sum() > 0 and cc.embed_t.linear.weight.grad.abs().sum() > 0

    cc.check_shapes(student=fs.shape, teacher=ft.shape)
    with pytest.raises(ValueError, match="CC: the teacher embedding head takes 10"):
        cc.check_shapes(student=fs.shape, teacher=torch.Size([4, 12]))
    with pytest.raises(ValueError, match="CC.*same width"):
        CCLoss(embed_dim=None).check_shapes(student=fs.shape, teacher=ft.shape)
    with pytest.raises(ValueError, match="CC.*batch"):
        cc.check_shapes(student=torch.Size([4, 6]), teacher=torch.Size([3, 10]))


# ----------------------------------------------------------------------------- RKD
def _huber(a, b):
    d = abs(a - b)
    return 0.5 * d * d if d < 1 else d - 0.5


def _rkd_by_loops(fs, ft, wd=25.0, wa=50.0):
    xs, xt = fs.flatten(1).tolist(), ft.flatten(1).tolist()
    b = len(xs)

    def dists(x):
        d = [[math.dist(x[i], x[j]) for j in range(b)] for i in range(b)]
        pos = [v for row in d for v in row if v > 0]
        m = sum(pos) / len(pos)
        return [[v / m for v in row] for row in d]

    def cos_at(x, j, i, k):
        u = [a - c for a, c in zip(x[i], x[j])]
        v = [a - c for a, c in zip(x[k], x[j])]
        nu, nv = math.sqrt(sum(a * a for a in u)), math.sqrt(sum(a * a for a in v))
        if nu == 0 or nv == 0:
            return 0.0
        return sum(a * c for a, c in zip(u, v)) / (nu * nv)

    ds, dt = dists(xs), dists(xt)
    loss_d = sum(_huber(ds[i][j], dt[i][j]) for i in range(b) for j in range(b)) / b**2
    loss_a = sum(_huber(cos_at(xs, j, i, k), cos_at(xt, j, i, k))
                 for j, i, k in itertools.product(range(b), repeat=3)) / b**3
    return wd * loss_d, wa * loss_a


def test_rkd_matches_loops():
    fs, ft = _feats(3, 4, seed=7), _feats(3, 6, seed=8)
    out = RKDLoss()(fs, ft)
    assert set(out) == {"distance", "angle"}
    d, a = _rkd_by_loops(fs, ft)
    assert out["distance"].item() == pytest.approx(d, rel=1e-6)
    assert out["angle"].item() == pytest.approx(a, rel=1e-6)
    out = RKDLoss(distance_weight=1.0, angle_weight=2.0)(fs, ft)
    assert out["distance"].item() == pytest.approx(d / 25, rel=1e-6)
    assert out["angle"].item() == pytest.approx(a / 25, rel=1e-6)


def test_rkd_by_hand_distance():
    # student: collinear points 0, 1, 2 -> distances 1, 2, 1 (mean over nonzero = 4/3)
    # teacher: an equilateral triangle -> all distances equal, normalised to 1
    s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]], dtype=torch.float64)
    # normalised student distances: 0.75 (x4) and 1.5 (x2); Huber vs 1: 0.5*0.25^2 and 0.5*0.5^2
    expected = (4 * 0.5 * 0.0625 + 2 * 0.5 * 0.25) / 9
    assert RKDLoss(distance_weight=1.0, angle_weight=0.0)(s, t)["distance"].item() == pytest.approx(expected, rel=1e-9)


def test_rkd_zero_scale_invariant_and_gradients():
    fs, ft = _feats(4, 5, seed=9), _feats(4, 8, seed=10)
    rkd = RKDLoss()
    zero = rkd(fs, fs.clone())
    assert zero["distance"].item() == pytest.approx(0.0, abs=1e-12) and zero["angle"].item() == pytest.approx(0.0, abs=1e-12)
    base, scaled = rkd(fs, ft), rkd(10.0 * fs, ft)
    assert scaled["distance"].item() == pytest.approx(base["distance"].item(), rel=1e-9)
    assert scaled["angle"].item() == pytest.approx(base["angle"].item(), rel=1e-9)
    _assert_student_grad_only(rkd, fs, ft)
    # duplicated student samples: distances hit the eps clamp, gradients stay finite
    dup = fs.clone()
    dup[1] = dup[0]
    _assert_student_grad_only(rkd, dup, ft)
    with pytest.raises(ValueError, match="RKD.*batch"):
        rkd.check_shapes(student=torch.Size([4, 5]), teacher=torch.Size([2, 5]))


# ----------------------------------------------------------------------------- PKT
def _pkt_by_loops(fs, ft, eps=1e-7):
    def probs(f):
        x = f.flatten(1).tolist()
        x = [[v / (math.sqrt(sum(u * u for u in r)) + eps) for v in r] for r in x]
        k = [[(sum(a * c for a, c in zip(r, q)) + 1) / 2 for q in x] for r in x]
        return [[v / sum(r) for v in r] for r in k]

    ps, pt = probs(fs), probs(ft)
    b = len(ps)
    return sum(pt[i][j] * math.log((pt[i][j] + eps) / (ps[i][j] + eps)) for i in range(b) for j in range(b)) / b**2


def test_pkt_matches_loops_zero_and_invariance():
    fs, ft = _feats(3, 4, seed=11), _feats(3, 7, seed=12)
    pkt = PKTLoss()
    assert pkt(fs, ft).item() == pytest.approx(_pkt_by_loops(fs, ft), rel=1e-9)
    assert pkt(fs, fs.clone()).item() == 0.0
    assert pkt(4.0 * fs, ft).item() == pytest.approx(pkt(fs, ft).item(), rel=1e-6)


def test_pkt_by_hand():
    # two orthogonal unit vectors: cosine kernel (K + 1) / 2 = [[1, .5], [.5, 1]] -> rows (2/3, 1/3)
    # two identical vectors: [[1, 1], [1, 1]] -> rows (1/2, 1/2)
    s = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    kl_row = 2 / 3 * math.log((2 / 3) / (1 / 2)) + 1 / 3 * math.log((1 / 3) / (1 / 2))
    assert PKTLoss(eps=0.0)(s, t).item() == pytest.approx(2 * kl_row / 4, rel=1e-9)


def test_pkt_gradients_and_checks():
    fs, ft = _feats(5, 4, seed=13), _feats(5, 9, seed=14)
    _assert_student_grad_only(PKTLoss(), fs, ft)
    low = PKTLoss()(fs.bfloat16(), ft.bfloat16())
    assert low.dtype == torch.float32 and low.item() == pytest.approx(PKTLoss()(fs, ft).item(), rel=1e-1)
    with pytest.raises(ValueError, match="PKT.*batch"):
        PKTLoss().check_shapes(student=torch.Size([5, 4]), teacher=torch.Size([4, 9]))
