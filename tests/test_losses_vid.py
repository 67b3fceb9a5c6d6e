"""VIDLoss: Gaussian NLL by loops, learned variance optimum, pooling, gradients, state round trip."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses.vid import VIDLoss
from kdrun.component import BuildContext


def _maps(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _setup(student, teacher, **kw):
    torch.manual_seed(0)
    vid = VIDLoss(**kw)
    shapes = {"student": [s.shape for s in student], "teacher": [t.shape for t in teacher]}
    vid.setup(BuildContext(shapes=shapes, num_train=10))
    vid.check_shapes(**shapes)
    return vid


def _nll_by_loops(mu, t, var):
    b, c, h, w = t.shape
    total = 0.0
    for i in range(b):
        for ch in range(c):
            for y in range(h):
                for x in range(w):
                    d = mu[i, ch, y, x].item() - t[i, ch, y, x].item()
                    total += 0.5 * (d * d / var[ch] + math.log(var[ch]))
    return total / (b * c * h * w)


def test_vid_initial_variance_and_nll_by_loops():
    s, t = [_maps(2, 3, 2, 2, seed=1)], [_maps(2, 4, 2, 2, seed=2)]
    vid = _setup(s, t, init_pred_var=5.0, eps=1e-5)
    assert torch.allclose(vid.variances()[0], torch.full((4,), 5.0), atol=1e-5)
    with torch.no_grad():
        vid.log_scales[0].copy_(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
        mu = vid.regressors[0](s[0])
    var = (F.softplus(vid.log_scales[0]) + 1e-5).tolist()
    assert vid(s, t).item() == pytest.approx(_nll_by_loops(mu, t[0], var), rel=1e-5)
    # the regressor: 1x1 convs without bias, widths in -> teacher -> teacher -> teacher (RepDistiller)
    convs = [m for m in vid.regressors[0].modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.bias) for m in convs] == [(3, 4, None), (4, 4, None), (4, 4, None)]
    assert _setup(s, t, mid_channels=6).regressors[0].net[0].out_channels == 6


def test_vid_variance_gradient_vanishes_at_the_per_channel_mse():
    s, t = [_maps(3, 3, 2, 2, seed=3)], [_maps(3, 2, 2, 2, seed=4)]
    vid = _setup(s, t)
    with torch.no_grad():
        mse = (vid.regressors[0](s[0]) - t[0]).pow(2).mean(dim=(0, 2, 3))
        vid.log_scales[0].copy_(torch.log(torch.expm1(mse - vid.eps)))  # softplus^-1(mse - eps)
    vid(s, t).backward()
    assert vid.log_scales[0].grad.abs().max().item() < 1e-6
    # and it is a minimum: moving the variance either way raises the loss
    base = vid(s, t).item()
    for delta in (-0.3, 0.3):
        with torch.no_grad():
            vid.log_scales[0].add_(delta)
        assert vid(s, t).item() > base
        with torch.no_grad():
            vid.log_scales[0].sub_(delta)


def test_vid_pools_the_larger_map_and_sums_pairs():
    s = [_maps(2, 3, 4, 4, seed=5), _maps(2, 3, 2, 2, seed=6)]
    t = [_maps(2, 5, 2, 2, seed=7), _maps(2, 5, 4, 4, seed=8)]
    vid = _setup(s, t)
    var = [v.view(1, -1, 1, 1) for v in vid.variances()]
    mu0 = vid.regressors[0](F.adaptive_avg_pool2d(s[0], 2))
    mu1 = vid.regressors[1](s[1])
    t1 = F.adaptive_avg_pool2d(t[1], 2)
    want = sum((0.5 * ((mu - tt).pow(2) / v + v.log())).mean() for mu, tt, v in ((mu0, t[0], var[0]), (mu1, t1, var[1])))
    assert vid(s, t).item() == pytest.approx(want.item(), rel=1e-6)


def test_vid_gradients_reach_student_and_own_parameters_not_teacher():
    s = [_maps(2, 3, 2, 2, seed=9).requires_grad_(True)]
    t = [_maps(2, 4, 2, 2, seed=10).requires_grad_(True)]
    vid = _setup(s, t)
    loss = vid(s, t)
    loss.backward()
    assert t[0].grad is None
    assert s[0].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vid.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert vid(s, t).dtype == torch.float32


def test_vid_state_round_trip():
    s, t = [_maps(2, 3, 2, 2, seed=11)], [_maps(2, 4, 2, 2, seed=12)]
    vid = _setup(s, t)
    with torch.no_grad():
        vid.log_scales[0].add_(0.7)
    torch.manual_seed(5)
    fresh = VIDLoss()
    fresh.setup(BuildContext(shapes={"student": [s[0].shape], "teacher": [t[0].shape]}, num_train=10))
    assert fresh(s, t).item() != vid(s, t).item()
    fresh.load_state_dict(vid.state_dict())
    assert torch.equal(fresh(s, t), vid(s, t))


def test_vid_check_shapes():
    vid = VIDLoss()
    with pytest.raises(ValueError, match="VID.*batch"):
        vid.check_shapes(student=torch.Size([2, 3, 4, 4]), teacher=torch.Size([3, 3, 4, 4]))
    with pytest.raises(ValueError, match="VID.*4-D"):
        vid.check_shapes(student=torch.Size([2, 3]), teacher=torch.Size([2, 3]))
    with pytest.raises(ValueError, match="VID.*same number"):
        vid.check_shapes(student=[torch.Size([2, 3, 4, 4])], teacher=[torch.Size([2, 3, 4, 4])] * 2)
    vid = _setup([_maps(2, 3, 2, 2)], [_maps(2, 4, 2, 2)])
    with pytest.raises(ValueError, match="VID: pair 0 was set up for 3 student and 4 teacher"):
        vid.check_shapes(student=torch.Size([2, 3, 2, 2]), teacher=torch.Size([2, 6, 2, 2]))
    with pytest.raises(RuntimeError, match="setup"):
        VIDLoss()(_maps(2, 3, 2, 2), _maps(2, 3, 2, 2))
