"""KD and cross-entropy against values worked out by hand."""
import math

import pytest
import torch

from kdrun.losses import CrossEntropy, KDLoss, standardize_logits


def test_kd_matches_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[0.0, 4.0, 0.0]])
    T = 2.0
    ps = [math.exp(v / T) for v in (1.0, 2.0, 0.0)]
    pt = [math.exp(v / T) for v in (0.0, 4.0, 0.0)]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(b * math.log(b / a) for a, b in zip(ps, pt))
    assert KDLoss(temperature=T)(s, t).item() == pytest.approx(kl * T * T, rel=1e-6)


def test_kd_is_batch_mean_and_zero_for_equal_logits():
    torch.manual_seed(0)
    s, t = torch.randn(4, 10), torch.randn(4, 10)
    loss = KDLoss(4.0)
    per_sample = torch.stack([loss(s[i:i + 1], t[i:i + 1]) for i in range(4)])
    assert loss(s, t).item() == pytest.approx(per_sample.mean().item(), rel=1e-5)
    assert loss(t, t).abs().item() < 1e-6


def test_kd_gradient_reaches_student_only():
    s = torch.randn(3, 5, requires_grad=True)
    t = torch.randn(3, 5)
    KDLoss(4.0)(s, t).backward()
    assert s.grad is not None and torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_standardize_is_shift_and_scale_invariant():
    torch.manual_seed(1)
    s, t = torch.randn(2, 6), torch.randn(2, 6)
    loss = KDLoss(2.0, standardize=True)
    assert loss(s * 3 + 5, t - 2).item() == pytest.approx(loss(s, t).item(), rel=1e-4)
    z = standardize_logits(s)
    assert torch.allclose(z.mean(-1), torch.zeros(2), atol=1e-6)


def test_kd_shape_check_and_bad_temperature():
    with pytest.raises(ValueError, match="student.*teacher"):
        KDLoss().check_shapes(student=torch.Size([2, 10]), teacher=torch.Size([2, 100]))
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(temperature=0)


def test_cross_entropy_with_label_smoothing_by_hand():
    z = torch.tensor([[2.0, 0.0]])
    y = torch.tensor([0])
    logp = torch.log_softmax(z, -1)[0]
    eps = 0.2
    expected = -((1 - eps + eps / 2) * logp[0] + (eps / 2) * logp[1])
    assert CrossEntropy(label_smoothing=eps)(z, y).item() == pytest.approx(expected.item(), rel=1e-6)
    soft = torch.tensor([[0.25, 0.75]])
    assert CrossEntropy()(z, soft).item() == pytest.approx(-(0.25 * logp[0] + 0.75 * logp[1]).item(), rel=1e-6)
