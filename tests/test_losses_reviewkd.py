"""ReviewKDLoss: HCL by loops, ABF fusion against its formula, review order, gradients, state round trip."""
from __future__ import annotations

import pytest
import torch

from kdrun.losses.reviewkd import ABF, ReviewKDLoss, hcl_loss
from kdrun.component import BuildContext


def _maps(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _mse_pooled_by_loops(a, b, lv):
    """MSE of two (B, C, H, W) maps average-pooled to lv x lv (H, W divisible by lv)."""
    bsz, c, h, w = a.shape
    kh, kw = h // lv, w // lv
    total = 0.0
    for i in range(bsz):
        for ch in range(c):
            for y in range(lv):
                for x in range(lv):
                    pa = a[i, ch, y * kh:(y + 1) * kh, x * kw:(x + 1) * kw].mean().item()
                    pb = b[i, ch, y * kh:(y + 1) * kh, x * kw:(x + 1) * kw].mean().item()
                    total += (pa - pb) ** 2
    return total / (bsz * c * lv * lv)


def test_hcl_by_loops():
    a8, b8 = _maps(2, 2, 8, 8, seed=1), _maps(2, 2, 8, 8, seed=2)
    a4, b4 = _maps(2, 3, 4, 4, seed=3), _maps(2, 3, 4, 4, seed=4)
    a1, b1 = _maps(2, 5, 1, 1, seed=5), _maps(2, 5, 1, 1, seed=6)
    # 8x8: full + 4x4 (1/2) + 2x2 (1/4) + 1x1 (1/8), / 1.875 ; 4x4: full + 2x2 (1/2) + 1x1 (1/4), / 1.75 ; 1x1: full
    l8 = (_mse_pooled_by_loops(a8, b8, 8) + _mse_pooled_by_loops(a8, b8, 4) / 2 + _mse_pooled_by_loops(a8, b8, 2) / 4
          + _mse_pooled_by_loops(a8, b8, 1) / 8) / 1.875
    l4 = (_mse_pooled_by_loops(a4, b4, 4) + _mse_pooled_by_loops(a4, b4, 2) / 2 + _mse_pooled_by_loops(a4, b4, 1) / 4) / 1.75
    l1 = _mse_pooled_by_loops(a1, b1, 1)
    got = hcl_loss([a8, a4, a1], [b8, b4, b1])
    assert got.item() == pytest.approx(l8 + l4 + l1, rel=1e-5)
    assert hcl_loss([a8], [a8.clone()]).item() == 0.0


def test_abf_fusion_formula():
    torch.manual_seed(0)
    abf = ABF(in_channels=3, mid_channels=4, out_channels=5, fuse=True).eval()
    x, y = _maps(2, 3, 4, 4, seed=7), _maps(2, 4, 2, 2, seed=8)
    out, fused = abf(x, y, (4, 4))
    xm = abf.conv1(x)
    yu = y.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # nearest upsampling, 2x
    w, b = abf.att_conv[0].weight.view(2, 8), abf.att_conv[0].bias
    att = torch.sigmoid(torch.einsum("oc,bchw->bohw", w, torch.cat([xm, yu], 1)) + b.view(1, 2, 1, 1))
    want = xm * att[:, :1] + yu * att[:, 1:]
    assert torch.allclose(fused, want, atol=1e-6)
    assert torch.allclose(out, abf.conv2(want), atol=1e-6)
    # a teacher map of another size: the fused map is resized (nearest) before conv2 and passed on resized
    out, fused = abf(x, y, (8, 8))
    assert out.shape == (2, 5, 8, 8) and fused.shape == (2, 4, 8, 8)
    assert torch.allclose(fused, want.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3), atol=1e-6)
    # the deepest stage does not fuse
    assert ABF(3, 4, 5, fuse=False).att_conv is None


def _pair_shapes():
    student = [torch.Size([2, 4, 8, 8]), torch.Size([2, 6, 4, 4]), torch.Size([2, 6])]
    teacher = [torch.Size([2, 5, 8, 8]), torch.Size([2, 7, 4, 4]), torch.Size([2, 7])]
    return student, teacher


def _setup(**kw):
    torch.manual_seed(0)
    term = ReviewKDLoss(**kw)
    s, t = _pair_shapes()
    term.setup(BuildContext(shapes={"student": s, "teacher": t}, num_train=10))
    term.check_shapes(student=s, teacher=t)
    return term


def _feats(shapes, seed):
    return [_maps(*sh, seed=seed + i) for i, sh in enumerate(shapes)]


def test_review_goes_deep_to_shallow_and_matches_manual_chain():
    term = _setup()
    s_shapes, t_shapes = _pair_shapes()
    s, t = _feats(s_shapes, 10), _feats(t_shapes, 20)
    assert [a.att_conv is None for a in term.abfs] == [False, False, True]
    assert all(a.conv1[0].out_channels == 6 for a in term.abfs)  # min(512, channels of the deepest student input)
    o2, r = term.abfs[2](s[2].view(2, 6, 1, 1), None, (1, 1))
    o1, r = term.abfs[1](s[1], r, (4, 4))
    o0, _ = term.abfs[0](s[0], r, (8, 8))
    want = hcl_loss([o0, o1, o2], [t[0], t[1], t[2].view(2, 7, 1, 1)])
    assert term(s, t).item() == pytest.approx(want.item(), rel=1e-6)
    assert [o.shape[1:] for o in term.review([s[0], s[1], s[2].view(2, 6, 1, 1)])] == [
        (5, 8, 8), (7, 4, 4), (7, 1, 1)]
    assert _setup(max_mid_channels=3).abfs[0].conv1[0].out_channels == 3


def test_gradients_reach_student_and_abfs_not_teacher():
    term = _setup()
    s_shapes, t_shapes = _pair_shapes()
    s = [x.requires_grad_(True) for x in _feats(s_shapes, 30)]
    t = [x.requires_grad_(True) for x in _feats(t_shapes, 40)]
    loss = term(s, t)
    loss.backward()
    assert all(x.grad is None for x in t)
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(p.grad is not None for p in term.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert term(s, t).dtype == torch.float32


def test_state_round_trip():
    term = _setup()
    s_shapes, t_shapes = _pair_shapes()
    s, t = _feats(s_shapes, 50), _feats(t_shapes, 60)
    term(s, t)  # moves BatchNorm statistics
    torch.manual_seed(4)
    fresh = ReviewKDLoss()
    fresh.setup(BuildContext(shapes={"student": s_shapes, "teacher": t_shapes}, num_train=10))
    fresh.load_state_dict(term.state_dict())
    term.eval()
    fresh.eval()
    assert torch.equal(term(s, t), fresh(s, t))


def test_check_shapes():
    term = ReviewKDLoss()
    s, t = _pair_shapes()
    with pytest.raises(ValueError, match="ReviewKD.*same number"):
        term.check_shapes(student=s, teacher=t[:2])
    with pytest.raises(ValueError, match="ReviewKD: pair 1 .*same batch"):
        term.check_shapes(student=s, teacher=[t[0], torch.Size([3, 7, 4, 4]), t[2]])
    term = _setup()
    with pytest.raises(ValueError, match="ReviewKD: stage 1 was set up for 6 student channels"):
        term.check_shapes(student=s, teacher=[t[0], torch.Size([2, 7, 2, 2]), t[2]])
    with pytest.raises(ValueError, match="ReviewKD: set up for 3 stages"):
        term([_maps(2, 4, 8, 8)], [_maps(2, 5, 8, 8)])
    with pytest.raises(RuntimeError, match="setup"):
        ReviewKDLoss()([_maps(2, 4, 8, 8)], [_maps(2, 5, 8, 8)])
