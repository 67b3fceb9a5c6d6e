"""ABLoss: alternative L2 by hand and by RepDistiller's formula, weights, connectors, state round trip."""
from __future__ import annotations

import pytest
import torch

from kdrun.losses.ab import ABLoss, ab_alternative_l2
from kdrun.models.adapters import ConvRegressor
from kdrun.component import BuildContext


def _maps(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _setup(student, teacher, **kw):
    torch.manual_seed(0)
    ab = ABLoss(**kw)
    shapes = {"student": [s.shape for s in student], "teacher": [t.shape for t in teacher]}
    ab.setup(BuildContext(shapes=shapes, num_train=10))
    ab.check_shapes(**shapes)
    return ab


def _alt_l2_by_loops(s, t, m):
    total = 0.0
    for a, b in zip(s.flatten().tolist(), t.flatten().tolist()):
        if b <= 0 and a > -m:
            total += (a + m) ** 2
        if b > 0 and a <= m:
            total += (a - m) ** 2
    return total


def test_alternative_l2_by_hand():
    s = torch.tensor([2.0, 0.5, -0.5, -2.0, 0.0, 1.0])
    t = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0, 0.0])
    # teacher on: relu(1 - s)^2 -> 0, 0.25 ; off (t <= 0): relu(1 + s)^2 -> 0.25, 0, 1, 4
    assert ab_alternative_l2(s, t, 1.0).tolist() == [0.0, 0.25, 0.25, 0.0, 1.0, 4.0]


def test_ab_term_by_loops_with_identity_connectors():
    s = [_maps(2, 3, 4, 4, seed=1), _maps(2, 5, 2, 2, seed=2), _maps(2, 6, 1, 1, seed=3)]
    t = [_maps(2, 3, 4, 4, seed=4), _maps(2, 5, 2, 2, seed=5), _maps(2, 6, 1, 1, seed=6)]
    ab = _setup(s, t)
    assert all(isinstance(c, torch.nn.Identity) for c in ab.connectors)
    weights = [0.25, 0.5, 1.0]  # 2^(i - K + 1), RepDistiller
    want = sum(w * _alt_l2_by_loops(a, b, 1.0) / 2 * 3 / 1000 for w, a, b in zip(weights, s, t))
    assert ab(s, t).item() == pytest.approx(want, rel=1e-5)
    custom = _setup(s, t, margin=0.5, scale=1.0, stage_weights=[1, 1, 1])
    want = sum(_alt_l2_by_loops(a, b, 0.5) / 2 for a, b in zip(s, t))
    assert custom(s, t).item() == pytest.approx(want, rel=1e-5)


def test_ab_zero_beyond_the_margin_on_the_teachers_side():
    t = [_maps(2, 3, 4, 4, seed=7)]
    s = [torch.where(t[0] > 0, 1.5, -1.5)]
    ab = _setup(s, t)
    assert ab(s, t).item() == 0.0
    s_wrong = [-s[0]]
    assert ab(s_wrong, t).item() > 0


def test_ab_connectors_gradients_and_teacher_untouched():
    s = [_maps(2, 3, 8, 8, seed=8).requires_grad_(True), _maps(2, 4, 4, 4, seed=9).requires_grad_(True)]
    t = [_maps(2, 6, 4, 4, seed=10).requires_grad_(True), _maps(2, 4, 4, 4, seed=11).requires_grad_(True)]
    ab = _setup(s, t)
    conn = ab.connectors[0]
    assert isinstance(conn, ConvRegressor) and not conn.use_relu and conn.conv.stride == (2, 2)
    assert isinstance(ab.connectors[1], torch.nn.Identity)
    out = ab(s, t)
    assert out.dim() == 0 and torch.isfinite(out)
    out.backward()
    assert all(x.grad is None for x in t)
    assert all(x.grad.abs().sum() > 0 for x in s)
    assert all(p.grad is not None for p in ab.parameters())


def test_ab_state_round_trip():
    s, t = [_maps(4, 3, 4, 4, seed=12)], [_maps(4, 5, 4, 4, seed=13)]
    ab = _setup(s, t)
    ab(s, t)  # moves the connector's BatchNorm statistics
    torch.manual_seed(3)
    fresh = ABLoss()
    fresh.setup(BuildContext(shapes={"student": [s[0].shape], "teacher": [t[0].shape]}, num_train=10))
    fresh.load_state_dict(ab.state_dict())
    ab.eval()
    fresh.eval()
    assert torch.equal(ab(s, t), fresh(s, t))


def test_ab_check_shapes():
    ab = ABLoss()
    with pytest.raises(ValueError, match="AB.*batch"):
        ab.check_shapes(student=[torch.Size([2, 3, 4, 4])], teacher=[torch.Size([3, 3, 4, 4])])
    with pytest.raises(ValueError, match="AB: pair 0: no connector maps 'student' \\(2, 3, 3, 3\\)"):
        ab.check_shapes(student=[torch.Size([2, 3, 3, 3])], teacher=[torch.Size([2, 3, 8, 8])])
    with pytest.raises(ValueError, match="AB: 2 stage_weights for 1 stage pairs"):
        ABLoss(stage_weights=[1, 2]).check_shapes(student=[torch.Size([2, 3, 4, 4])], teacher=[torch.Size([2, 3, 4, 4])])
    with pytest.raises(ValueError, match="AB: no connector"):
        ab.setup(BuildContext(shapes={"student": [torch.Size([2, 3, 3, 3])], "teacher": [torch.Size([2, 3, 8, 8])]}, num_train=10))
    with pytest.raises(RuntimeError, match="setup"):
        ABLoss()([_maps(2, 3, 2, 2)], [_maps(2, 3, 2, 2)])
