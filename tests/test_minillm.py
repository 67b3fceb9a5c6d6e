"""MiniLLM's policy gradient: the discounted, length-normalised returns and the loss against a loop over the
formula."""
from __future__ import annotations

import torch

from kdrun.losses import MiniLLMLoss
from kdrun.losses.minillm import discounted_returns


def test_returns_of_the_later_tokens():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.tensor([[0, 1, 1, 1]])
    assert torch.allclose(discounted_returns(r, m, 0.5, False), torch.tensor([[2 + 1.5 + 1.0, 3 + 2.0, 4.0, 0.0]]))
    assert torch.allclose(discounted_returns(r, m, 0.5, True), torch.tensor([[4.5 / 3, 5.0 / 2, 4.0, 0.0]]))


def test_loss_and_gradient_against_the_formula():
    torch.manual_seed(0)
    b, length, v, gamma = 2, 5, 6, 0.9
    zs = torch.randn(b, length, v, requires_grad=True)
    zt = torch.randn(b, length, v)
    y = torch.randint(0, v, (b, length))
    m = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    got = MiniLLMLoss(gamma=gamma, length_norm=True, chunk_size=3)(zs, zt, y, m)
    ls, lt = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    total, count = 0.0, 0
    for i in range(b):
        for t in range(length):
            if not m[i, t]:
                continue
            later = [u for u in range(t + 1, length) if m[i, u]]
            ret = sum(gamma ** (u - t - 1) * (lt[i, u, y[i, u]] - ls[i, u, y[i, u]]).item() for u in later)
            ret = ret / max(1, len(later))
            single = (ls[i, t].exp() * (ls[i, t] - lt[i, t])).sum()
            total = total + single - ret * ls[i, t, y[i, t]]
            count += 1
    want = total / count
    assert torch.allclose(got, want, atol=1e-5)
    (g1,) = torch.autograd.grad(got, zs)
    (g2,) = torch.autograd.grad(want, zs)
    assert torch.allclose(g1, g2, atol=1e-5)  # the returns carry no gradient
