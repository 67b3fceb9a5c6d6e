"""DDK: the factor-smooth update of the domain weights, the per-domain statistics, and the domain-weighted sampler
(the same draws on every rank and after a resume)."""
from __future__ import annotations

import torch

from kdrun.data.tensors import TensorLoader
from kdrun.losses import DDKLoss
from kdrun.losses.tokens import kl, log_probs


def test_factor_smooth_update_by_hand():
    term = DDKLoss(num_domains=3, smoothing=0.5)
    sums = torch.tensor([[4.0, 3.0, 0.0], [2.0, 3.0, 0.0], [2.0, 1.0, 0.0]], dtype=torch.float64)  # domain c unseen
    w = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    ratio = torch.tensor([(4 / 2) / (2 / 2), (3 / 1) / (3 / 1)], dtype=torch.float64)  # l_S / l_T per seen domain
    factor = torch.cat([torch.softmax(ratio, 0) * 0.5, torch.tensor([0.5], dtype=torch.float64)])
    want = 0.5 * factor + 0.5 / 3
    assert torch.allclose(term.updated(sums, w), want) and torch.isclose(want.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_the_term_is_t2_kl_and_sums_each_domains_losses():
    torch.manual_seed(0)
    zs, zt = torch.randn(4, 3, 7, requires_grad=True), torch.randn(4, 3, 7)
    y = torch.randint(0, 7, (4, 3))
    m = torch.ones(4, 3, dtype=torch.bool)
    dom = torch.tensor([0, 1, 1, 0])
    term = DDKLoss(num_domains=2, temperature=2.0).train()
    got = term(zs, zt, y, m, dom)
    assert torch.allclose(got, 4.0 * kl(log_probs(zt, 2.0), log_probs(zs, 2.0)).mean(), atol=1e-6)
    ce = torch.nn.functional.cross_entropy(zs.detach().transpose(1, 2), y, reduction="none").sum(1).double()
    assert torch.allclose(term.sums[0], torch.stack([ce[[0, 3]].sum(), ce[[1, 2]].sum()]))
    assert term.sums[2].tolist() == [6.0, 6.0]
    term.on_step(100, 1000)  # an update: statistics consumed, weights moved toward the lagging domain
    assert term.sums.abs().sum() == 0 and term.updates == 1 and abs(float(term.weights.sum()) - 1) < 1e-9


def _loader(weights, rank=0, world=1, seed=0):
    n = 300
    fields = {"input_ids": torch.arange(n).view(-1, 1), "domain": torch.tensor([0] * 200 + [1] * 80 + [2] * 20)}
    loader = TensorLoader(fields, batch_size=60, train=True, device=torch.device("cpu"), seed=seed, rank=rank,
                          world_size=world)
    loader.domain_weights = lambda: torch.tensor(weights, dtype=torch.float64)
    return loader


def test_the_sampler_draws_domains_in_the_weighted_proportions_alike_on_every_rank():
    loader = _loader([0.2, 0.3, 0.5])
    drawn = []
    for epoch in range(20):
        loader.set_epoch(epoch)
        drawn += [b["domain"] for b in loader]
    drawn = torch.cat(drawn)
    freq = torch.bincount(drawn, minlength=3).double() / drawn.numel()
    assert torch.allclose(freq, torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64), atol=0.03)
    whole = [b["index"] for b in _loader([0.2, 0.3, 0.5])]
    shares = [[b["index"] for b in _loader([0.2, 0.3, 0.5], rank=r, world=2)] for r in range(2)]
    assert all(torch.equal(torch.cat([a, b]), w) for a, b, w in zip(shares[0], shares[1], whole))  # one global draw
    resumed = _loader([0.2, 0.3, 0.5])
    resumed.set_epoch(0, start=3)
    assert all(torch.equal(a["index"], b) for a, b in zip(list(resumed), whole[3:]))  # a resume draws alike
