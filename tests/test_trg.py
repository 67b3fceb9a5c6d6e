"""TRG (token-level relationship graph) distillation: tokens, sampler, graph, the three terms, schedule, gradients."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from kdrun.component import BuildContext
from kdrun.losses.trg import (
    TokenSampler, TRGContextualLoss, TRGGlobalLoss, TRGLocalLoss, TRGLoss, aligned_tokens, build_token_graph,
    contextual_loss, global_infonce_loss, knn_indices, local_preserving_loss, temperature_at, to_tokens,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread (thread wake-ups dominate on a busy 2-core machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _shapes(s, t):
    return {"student": torch.Size(s), "teacher": torch.Size(t)}


def _maps(b=3, cs=6, ct=10, hs=4, ht=4, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, cs, hs, hs, generator=g, dtype=dtype),
            torch.randn(b, ct, ht, ht, generator=g, dtype=dtype))


def _trg(s, t, **kw):
    term = TRGLoss(**kw)
    term.setup(BuildContext(shapes=_shapes(s.shape, t.shape), num_train=100))
    term.check_shapes(s.shape, t.shape)
    return term


# ----------------------------------------------------------------------------- tokens and grids
def test_to_tokens_is_row_major_and_pools_patches():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert to_tokens(x)[0, :, 0].tolist() == list(range(16))
    pooled = to_tokens(x, patch_size=2)[0, :, 0].tolist()
    assert pooled == [2.5, 4.5, 10.5, 12.5]  # means of the four 2x2 patches, row-major
    tokens = torch.randn(2, 9, 5)
    assert to_tokens(tokens) is tokens  # tokens that need nothing come back as they are


def test_grid_alignment_teacher_8x8_student_4x4():
    s, t = torch.randn(2, 6, 4, 4), torch.randn(2, 10, 8, 8)
    ts, tt = aligned_tokens(s, t)
    assert ts.shape == (2, 16, 6) and tt.shape == (2, 16, 10)
    assert torch.allclose(tt, to_tokens(t, patch_size=2))  # 8x8 -> 4x4 is 2x2 average pooling
    term = _trg(s, t, num_samples=8, k=3)
    out = term(s, t)
    assert set(out) == {"contextual", "local", "global"} and all(torch.isfinite(v) for v in out.values())


def test_cnn_teacher_vit_student_tokens_align():
    t = torch.randn(2, 12, 8, 8)  # CNN map, 64 positions
    s = torch.randn(2, 64, 7)  # ViT patch tokens (class token removed)
    ts, tt = aligned_tokens(s, t)
    assert ts.shape == (2, 64, 7) and tt.shape == (2, 64, 12)
    ts, tt = aligned_tokens(torch.randn(2, 16, 7), t)  # a 4x4 token grid pools the teacher to 4x4
    assert ts.shape == (2, 16, 7) and tt.shape == (2, 16, 12)
    out = _trg(s, t, k=4)(s, t)
    assert all(torch.isfinite(v) for v in out.values())


def test_check_shapes_rejects_what_cannot_work():
    term = TRGLoss()
    with pytest.raises(ValueError, match="batch"):
        term.check_shapes(torch.Size([2, 4, 8, 8]), torch.Size([3, 4, 8, 8]))
    with pytest.raises(ValueError, match="square"):
        term.check_shapes(torch.Size([2, 10, 4]), torch.Size([2, 4, 8, 8]))
    with pytest.raises(ValueError, match="divisible"):
        TRGLoss(patch_size=3).check_shapes(torch.Size([2, 4, 8, 8]), torch.Size([2, 4, 8, 8]))
    with pytest.raises(ValueError, match="feature map"):
        term.check_shapes(torch.Size([2, 4]), torch.Size([2, 4, 8, 8]))
    term.setup(BuildContext(shapes=_shapes((2, 4, 8, 8), (2, 6, 8, 8)), num_train=10))
    with pytest.raises(ValueError, match="width"):
        term.check_shapes(torch.Size([2, 5, 8, 8]), torch.Size([2, 6, 8, 8]))
    with pytest.raises(RuntimeError, match="setup"):
        TRGGlobalLoss()(torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4))


# ----------------------------------------------------------------------------- sampler
def test_sampler_is_seeded_distinct_and_resumable():
    a, b = TokenSampler(5, seed=7), TokenSampler(5, seed=7)
    ia = [a(4, 16) for _ in range(3)]
    ib = [b(4, 16) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(ia, ib))
    assert not torch.equal(ia[0], ia[1])  # a new draw every step
    assert not torch.equal(TokenSampler(5, seed=8)(4, 16), ia[0])
    for idx in ia:
        assert idx.shape == (4, 5) and idx.dtype == torch.long
        assert int(idx.min()) >= 0 and int(idx.max()) < 16
        assert all(len(set(row)) == 5 for row in idx.tolist())  # distinct positions within an image
        assert torch.equal(idx, idx.sort(dim=1).values)
    # state round trip (through torch.save / weights_only load, as checkpoints do) continues the sequence
    c = TokenSampler(5, seed=7)
    c(4, 16)
    buf = io.BytesIO()
    torch.save(c.state_dict(), buf)
    buf.seek(0)
    d = TokenSampler(5, seed=123)
    d.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(d(4, 16), ia[1]) and torch.equal(d(4, 16), ia[2])
    # all tokens kept: no draw, identity positions
    assert torch.equal(TokenSampler(None)(2, 6), torch.arange(6).expand(2, 6))
    assert TokenSampler(10)(2, 6).shape == (2, 6)


def test_sampler_under_data_parallelism_keeps_its_rows_of_the_global_draw():
    """Issue 16: each rank drew from the same CPU generator for its own images, so image i of every rank got
    the same positions. Now each rank keeps its rows of one draw for the global micro-batch (on the device)."""
    whole = TokenSampler(5, seed=3)(8, 16)
    ranks = [TokenSampler(5, seed=3)(4, 16, "cpu", layout=((4, 4), r)) for r in (0, 1)]
    assert torch.equal(torch.cat(ranks), whole)
    assert not torch.equal(ranks[0], ranks[1])
    uneven = TokenSampler(5, seed=3)(3, 16, "cpu", layout=((5, 3), 1))
    assert torch.equal(uneven, whole[5:8])


def test_sampler_state_of_another_device_type_or_format_continues_seeded():
    a = TokenSampler(5, seed=7)
    a(4, 16)
    state = a.get_extra_state()
    b = TokenSampler(5, seed=0)
    b.set_extra_state({**state, "device": "cuda"})  # a CUDA run's checkpoint resumed on the CPU
    c = TokenSampler(5, seed=0)
    c.set_extra_state({**state, "device": "cuda"})
    assert torch.equal(b(4, 16), c(4, 16))  # seeded from (seed, draws): reproducible
    old = TokenSampler(5, seed=0)
    old.set_extra_state({k: v for k, v in state.items() if k != "device"})  # written before the device key existed
    assert torch.equal(old(4, 16), a(4, 16))


def test_teacher_and_student_get_the_same_positions():
    term = TRGLocalLoss(num_samples=5)
    pos = torch.arange(16.0).view(1, 16, 1)
    s = torch.cat([pos.expand(3, 16, 1), torch.randn(3, 16, 2)], dim=2)
    t = torch.cat([pos.expand(3, 16, 1), torch.randn(3, 16, 4)], dim=2)
    ss, ts = term.sample(s, t)
    assert ss.shape == (3, 5, 3) and ts.shape == (3, 5, 5)
    assert torch.equal(ss[..., 0], ts[..., 0])
    assert not torch.equal(ss[0, :, 0], ss[1, :, 0])  # independent draws per image


def test_loss_state_dict_round_trip_reproduces_the_next_step():
    s, t = _maps(b=4, hs=8, ht=8)
    a = _trg(s, t, num_samples=6, k=4, seed=3)
    a(s, t)
    b = _trg(s, t, num_samples=6, k=4, seed=99)
    b.load_state_dict(a.state_dict())
    out_a, out_b = a(s, t), b(s, t)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


def test_deepcopy_probe_does_not_advance_the_original():
    s, t = _maps(b=2, hs=8, ht=8)
    a, b = _trg(s, t, seed=1), _trg(s, t, seed=1)
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        copy.deepcopy(a)(s, t)  # the builder's probe forward
    out_a, out_b = a(s, t), b(s, t)
    assert all(torch.equal(out_a[k], out_b[k]) for k in out_a)


# ----------------------------------------------------------------------------- graph
def test_knn_graph_on_points_on_a_line():
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]])
    sigma = 2.0
    g = build_token_graph(x, k=2, sigma=sigma)
    assert g.indices.tolist() == [[1, 2], [0, 2], [1, 0], [2, 1], [3, 2]]
    d2 = [[1, 9], [1, 4], [4, 9], [16, 36], [64, 144]]
    assert torch.allclose(g.sq_dists, torch.tensor(d2, dtype=torch.float32))
    expected = torch.tensor([[math.exp(-v / (2 * sigma)) for v in row] for row in d2])
    assert torch.allclose(g.weights, expected)


def test_knn_never_picks_self_even_for_duplicates_and_batches_graphs():
    x = torch.tensor([[0.0], [0.0], [5.0]])
    idx = knn_indices(x, 1)
    assert idx[:, 0].tolist() == [1, 0, 1] or idx[:, 0].tolist() == [1, 0, 0]
    assert all(i != row for row, i in enumerate(idx[:, 0].tolist()))
    xb = torch.randn(3, 6, 4)  # one graph per leading index (per-image graphs)
    g = build_token_graph(xb, k=2, sigma=1.0)
    assert g.indices.shape == (3, 6, 2) and int(g.indices.max()) < 6
    for b in range(3):
        assert torch.equal(g.indices[b], knn_indices(xb[b], 2))
        ref = build_token_graph(xb[b], k=2, sigma=1.0)
        assert torch.allclose(g.weights[b], ref.weights)
    with pytest.raises(ValueError, match="k must be"):
        knn_indices(torch.randn(3, 2), 3)


# ----------------------------------------------------------------------------- known answers
@pytest.mark.parametrize("graph", ["batch", "image"])
@pytest.mark.parametrize("logits", ["kernel", "log_kernel"])
def test_identical_features_give_zero_local_and_contextual(graph, logits):
    x = torch.randn(3, 8, 4, 4)
    out = _trg(x, x, num_samples=6, k=3, graph=graph, local_logits=logits)(x, x.clone())
    assert out["local"].abs().item() < 1e-7
    assert out["contextual"].abs().item() < 1e-12
    assert out["global"].item() > 0
    tok = torch.randn(2, 16, 5)
    assert TRGLocalLoss(k=4)(tok, tok.clone()).abs().item() < 1e-7
    assert TRGContextualLoss()(tok, tok.clone()).abs().item() < 1e-12


def test_different_features_give_positive_losses():
    s, t = _maps(b=3, hs=4, ht=4)
    out = _trg(s, t, num_samples=8, k=3, local_logits="log_kernel")(s, t)
    assert out["local"].item() > 0 and out["contextual"].item() > 0


def test_local_loss_matches_a_by_hand_computation():
    s = torch.tensor([[[0.0], [2.0], [3.0]]])  # one image, three 1-d tokens
    t = torch.tensor([[[0.0], [1.0], [3.0]]])
    sigma = 1.0
    loss = local_preserving_loss(s, t, k=1, sigma=sigma, normalize=False, logits="kernel")
    # k=1: every neighbourhood has one node, so both distributions are [1]: KL 0
    assert loss.abs().item() < 1e-7
    loss = local_preserving_loss(s, t, k=2, sigma=sigma, normalize=False, logits="log_kernel")
    # k=2 covers all other nodes; teacher neighbours of 0: (1, 2), of 1: (0, 2), of 2: (1, 0)
    d_t = [[1, 9], [1, 4], [4, 9]]
    d_s = [[4, 9], [4, 1], [1, 9]]

    def probs(row):
        e = [math.exp(-v / (2 * sigma)) for v in row]
        return [u / sum(e) for u in e]

    kl = sum(sum(p * math.log(p / q) for p, q in zip(probs(rt), probs(rs))) for rt, rs in zip(d_t, d_s)) / 3
    assert math.isclose(loss.item(), kl, rel_tol=1e-5)


def test_global_loss_equals_plain_infonce():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 5, generator=g)  # 6 tokens in all
    term = TRGGlobalLoss(proj_dim=3, tau_start=0.3, num_samples=None)
    term.setup(BuildContext(shapes=_shapes(s.shape, t.shape), num_train=10))
    loss = term(s, t)
    zs = term.head_s(s.reshape(6, 4)).tolist()
    zt = term.head_t(t.reshape(6, 5)).tolist()

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))

    total = 0.0
    for i in range(6):
        den = sum(math.exp(cos(zs[i], zt[j]) / 0.3) for j in range(6))
        total += -math.log(math.exp(cos(zs[i], zt[i]) / 0.3) / den)
    assert math.isclose(loss.item(), total / 6, rel_tol=1e-5)
    assert torch.allclose(global_infonce_loss(torch.tensor(zs), torch.tensor(zt), 0.3), loss)


def test_contextual_loss_is_mse_of_attention_maps():
    s, t = torch.randn(2, 3, 4), torch.randn(2, 3, 6)

    def cmap(x):
        return torch.softmax(torch.einsum("bnd,bmd->bnm", x, x) / math.sqrt(x.shape[-1]), dim=-1)

    assert torch.allclose(contextual_loss(s, t), ((cmap(s) - cmap(t)) ** 2).mean())


def test_trg_loss_is_the_weighted_parts():
    s, t = _maps(b=3, hs=4, ht=4)
    kw = dict(num_samples=None, k=3)
    full = _trg(s, t, alpha=2.0, beta=3.0, gamma=0.5, **kw)
    local = TRGLocalLoss(k=3, num_samples=None)
    ctx = TRGContextualLoss()
    glob = TRGGlobalLoss(num_samples=None)
    glob.setup(BuildContext(shapes=_shapes(s.shape, t.shape), num_train=10))
    glob.head_s.load_state_dict(full.head_s.state_dict())
    glob.head_t.load_state_dict(full.head_t.state_dict())
    out = full(s, t)
    assert torch.allclose(out["contextual"], 2.0 * ctx(s, t))
    assert torch.allclose(out["local"], 3.0 * local(s, t))
    assert torch.allclose(out["global"], 0.5 * glob(s, t))


# ----------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_temperature_schedule_start_middle_end(schedule):
    assert temperature_at(0, 5, 0.5, 0.1, schedule) == pytest.approx(0.5)
    assert temperature_at(2, 5, 0.5, 0.1, schedule) == pytest.approx(0.3)
    assert temperature_at(4, 5, 0.5, 0.1, schedule) == pytest.approx(0.1)
    assert temperature_at(0, 1, 0.5, 0.1, schedule) == pytest.approx(0.5)


def test_cosine_schedule_shape_and_set_progress():
    assert temperature_at(1, 5, 0.5, 0.1, "cosine") == pytest.approx(0.1 + 0.4 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert temperature_at(3, 5, 0.5, 0.1, "constant") == 0.5
    term = TRGLoss(tau_start=1.0, tau_end=0.2)
    assert term.temperature == 1.0
    term.on_epoch_start(0, 11)
    assert term.temperature == pytest.approx(1.0)
    term.on_epoch_start(5, 11)
    assert term.temperature == pytest.approx(0.6)
    term.on_epoch_start(10, 11)
    assert term.temperature == pytest.approx(0.2)
    g = TRGGlobalLoss(tau_start=0.4, tau_end=0.2, schedule="linear")
    g.on_epoch_start(1, 3)
    assert g.temperature == pytest.approx(0.3)


# ----------------------------------------------------------------------------- gradients
def test_gradients_reach_student_and_heads_never_teacher():
    s, t = _maps(b=3, hs=4, ht=8)
    s.requires_grad_(True)
    t.requires_grad_(True)
    term = _trg(s, t, num_samples=6, k=3, local_logits="log_kernel")
    out = term(s, t)
    sum(out.values()).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    for head in (term.head_s, term.head_t):
        assert head.weight.grad is not None and head.weight.grad.abs().sum() > 0
    # each part on its own reaches the student
    for part in ("contextual", "local", "global"):
        s.grad = None
        term(s, t)[part].backward()
        assert s.grad.abs().sum() > 0, part


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    ts, tt = to_tokens(s.detach(), 2), to_tokens(t, 2)
    assert torch.autograd.gradcheck(lambda x: local_preserving_loss(to_tokens(x, 2), tt, k=3, sigma=0.7,
                                                                    logits="log_kernel"), (s,))
    assert torch.autograd.gradcheck(lambda x: local_preserving_loss(to_tokens(x, 2), tt, k=3, sigma=0.7), (s,))
    assert torch.autograd.gradcheck(lambda x: contextual_loss(to_tokens(x), to_tokens(t)), (s,))
    term = _trg(s, t, num_samples=None, k=3, proj_dim=4).double()
    assert torch.autograd.gradcheck(lambda x: sum(term(x, t).values()), (s,))
    ws, wt = term.head_s.weight.detach(), term.head_t.weight.detach()
    zt = tt.reshape(-1, 5) @ wt.t()
    assert torch.autograd.gradcheck(lambda x, w: global_infonce_loss(x @ w.t(), zt, 0.5),
                                    (ts.reshape(-1, 3).clone().requires_grad_(), ws.clone().requires_grad_()))


def test_low_precision_inputs_give_float32_losses():
    s, t = _maps(b=2, hs=8, ht=8)
    term = _trg(s, t, k=3)
    out = term(s.bfloat16(), t.half())
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_in_forward_on_cuda():
    s, t = _maps(b=8, hs=8, ht=8)
    s, t = s.cuda().requires_grad_(), t.cuda()
    term = _trg(s, t, k=4).cuda()
    term(s, t)  # warm-up (lazy CUDA init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = term(s, t)
        sum(out.values()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert s.grad is not None
