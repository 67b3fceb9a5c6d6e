"""CRDLoss: NCE by loops, partition constants, memory update, negatives, state round trip."""
from __future__ import annotations

import math

import pytest
import torch

from kdrun.losses.crd import CRDLoss
from kdrun.component import BuildContext


def _shapes(b, ds, dt, target=True):
    shapes = {"student": torch.Size([b, ds]), "teacher": torch.Size([b, dt]), "index": torch.Size([b])}
    if target:
        shapes["target"] = torch.Size([b])
    return shapes


def _make(b=3, ds=5, dt=7, n=12, feat_dim=4, k=6, target=False, seed=0, **kw):
    torch.manual_seed(seed)
    crd = CRDLoss(feat_dim=feat_dim, num_negatives=k, **kw)
    crd.setup(BuildContext(shapes=_shapes(b, ds, dt, target), num_train=n))
    return crd


def _inputs(b=3, ds=5, dt=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, ds, generator=g), torch.randn(b, dt, generator=g)


def _embed_by_loops(head, x):
    w, bias = head.linear.weight.tolist(), head.linear.bias.tolist()
    out = []
    for row in x.tolist():
        v = [sum(wi * xi for wi, xi in zip(wr, row)) + bi for wr, bi in zip(w, bias)]
        norm = math.sqrt(sum(u * u for u in v))
        out.append([u / norm for u in v])
    return out


def _nce_by_loops(scores, n, eps=1e-7):
    b, k = len(scores), len(scores[0]) - 1
    noise = k / n
    total = 0.0
    for row in scores:
        total += math.log(row[0] / (row[0] + noise + eps))
        total += sum(math.log(noise / (x + noise + eps)) for x in row[1:])
    return -total / b


def test_crd_matches_loops_and_fixes_z_on_first_batch():
    n, tau = 12, 0.07
    crd = _make(n=n)
    s, t = _inputs()
    index = torch.tensor([4, 0, 9])
    mem_s, mem_t = crd.memory_s.tolist(), crd.memory_t.tolist()
    gen_state = crd.random.draw("cpu").get_state()
    idx = crd.sample_indices(index).tolist()
    assert [r[0] for r in idx] == [4, 0, 9]
    crd.random.generator.set_state(gen_state)  # the same negatives again: the term's own generator, not torch's
    torch.manual_seed(123)
    out = crd(s, t, index)

    es, et = _embed_by_loops(crd.embed_s, s), _embed_by_loops(crd.embed_t, t)
    raw_s = [[math.exp(sum(a * c for a, c in zip(es[i], mem_t[j])) / tau) for j in idx[i]] for i in range(3)]
    raw_t = [[math.exp(sum(a * c for a, c in zip(et[i], mem_s[j])) / tau) for j in idx[i]] for i in range(3)]
    z_s = n * sum(map(sum, raw_s)) / (3 * 7)
    z_t = n * sum(map(sum, raw_t)) / (3 * 7)
    want_s = _nce_by_loops([[x / z_s for x in r] for r in raw_s], n)
    want_t = _nce_by_loops([[x / z_t for x in r] for r in raw_t], n)
    assert out["student_anchor"].item() == pytest.approx(want_s, rel=1e-4)
    assert out["teacher_anchor"].item() == pytest.approx(want_t, rel=1e-4)
    assert crd.z_s.item() == pytest.approx(z_s, rel=1e-5) and crd.z_t.item() == pytest.approx(z_t, rel=1e-5)

    # the constants stay fixed afterwards
    crd(s * 3.0, t - 1.0, torch.tensor([1, 2, 3]))
    assert crd.z_s.item() == pytest.approx(z_s, rel=1e-5) and crd.z_t.item() == pytest.approx(z_t, rel=1e-5)


def test_crd_memory_moves_by_momentum_at_batch_rows_only():
    crd = _make(momentum=0.5)
    s, t = _inputs()
    index = torch.tensor([2, 7, 5])
    before_s, before_t = crd.memory_s.clone(), crd.memory_t.clone()
    with torch.no_grad():
        es = torch.tensor(_embed_by_loops(crd.embed_s, s))
        et = torch.tensor(_embed_by_loops(crd.embed_t, t))
    crd(s, t, index)
    for mem, before, e in ((crd.memory_s, before_s, es), (crd.memory_t, before_t, et)):
        for row in range(mem.shape[0]):
            if row in index.tolist():
                i = index.tolist().index(row)
                v = 0.5 * before[row] + 0.5 * e[i]
                assert torch.allclose(mem[row], v / v.norm(), atol=1e-6)
                assert mem[row].norm().item() == pytest.approx(1.0, abs=1e-6)
            else:
                assert torch.equal(mem[row], before[row])
    # evaluation mode changes no state
    crd.eval()
    state = {k: v.clone() for k, v in crd.state_dict().items() if k != "_extra_state"}
    generator = crd.state_dict()["_extra_state"]["generator"].clone()
    crd(s, t, torch.tensor([0, 1, 3]))
    assert all(torch.equal(v, crd.state_dict()[k]) for k, v in state.items())
    assert torch.equal(generator, crd.state_dict()["_extra_state"]["generator"])


def test_crd_negatives_uniform_without_target():
    crd = _make(n=9, k=4000)
    torch.manual_seed(0)
    idx = crd.sample_indices(torch.tensor([1, 2, 3]))
    assert idx.shape == (3, 4001) and idx.dtype == torch.long
    assert idx[:, 0].tolist() == [1, 2, 3]
    counts = torch.bincount(idx[:, 1:].flatten(), minlength=9).float()
    assert counts.min() > 0.8 * counts.mean() and counts.max() < 1.2 * counts.mean()


def test_crd_negatives_exclude_same_class_vectorised():
    n, classes = 30, 3
    labels = torch.arange(n) % classes
    torch.manual_seed(0)
    crd = CRDLoss(feat_dim=4, num_negatives=3000)
    crd.setup(BuildContext(shapes=_shapes(4, 5, 7, target=True), num_train=n, train_labels=labels))
    index, target = torch.tensor([0, 1, 2, 4]), torch.tensor([0, 1, 2, 1])
    idx = crd.sample_indices(index, target)
    neg = idx[:, 1:]
    assert (labels[neg] != target.unsqueeze(1)).all()
    for row, y in zip(neg, target.tolist()):  # uniform over the other-class samples
        counts = torch.bincount(row, minlength=n)[labels != y].float()
        assert counts.min() > 0.7 * counts.mean()

    # learned online from (index, target) when no labels are given up front
    crd = _make(b=4, n=n, k=500, target=True)
    assert (crd.labels == -1).all()
    s, t = _inputs(b=4)
    crd(s, t, index, target)
    assert crd.labels[index].tolist() == target.tolist() and (crd.labels[5:] == -1).all()
    idx = crd.sample_indices(index, target)
    seen = set(index.tolist())
    for i, row in enumerate(idx[:, 1:].tolist()):  # known same-class samples (and the sample itself) excluded
        same = {j for j in seen if crd.labels[j].item() == target[i].item()}
        assert not same & set(row)


def test_crd_gradients_reach_student_and_heads_not_teacher():
    crd = _make()
    s, t = _inputs()
    s.requires_grad_(True)
    t.requires_grad_(True)
    out = crd(s, t, torch.tensor([0, 1, 2]))
    sum(out.values()).backward()
    assert t.grad is None
    assert s.grad is not None and s.grad.abs().sum() > 0
    for p in crd.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_crd_state_round_trip():
    crd = _make(target=True)
    s, t = _inputs()
    index, target = torch.tensor([3, 1, 8]), torch.tensor([0, 1, 0])
    crd(s, t, index, target)
    crd(s + 0.5, t, torch.tensor([2, 4, 6]), target)
    sd = crd.state_dict()
    assert {"memory_s", "memory_t", "z_s", "z_t", "labels"} <= set(sd)

    fresh = _make(target=True, seed=99)
    assert not torch.equal(fresh.memory_s, crd.memory_s)
    fresh.load_state_dict(sd)
    assert fresh.z_s.item() > 0 and fresh.z_s.item() == crd.z_s.item()
    torch.manual_seed(7)
    a = crd(s, t, index, target)
    torch.manual_seed(8)  # the global generator plays no part: the negatives' generator is in the state
    b = fresh(s, t, index, target)
    for k in a:
        assert torch.equal(a[k], b[k])
    for k, v in crd.state_dict().items():
        if k == "_extra_state":  # the negatives' generator continued identically
            assert torch.equal(v["generator"], fresh.state_dict()[k]["generator"])
        else:
            assert torch.equal(v, fresh.state_dict()[k])


def test_crd_check_shapes_and_setup_errors():
    crd = _make(b=3, ds=5, dt=7)
    crd.check_shapes(student=torch.Size([3, 5]), teacher=torch.Size([3, 7]), index=torch.Size([3]))
    with pytest.raises(ValueError, match="CRD.*batch size"):
        crd.check_shapes(student=torch.Size([3, 5]), teacher=torch.Size([4, 7]), index=torch.Size([3]))
    with pytest.raises(ValueError, match="CRD.*'index'"):
        crd.check_shapes(student=torch.Size([3, 5]), teacher=torch.Size([3, 7]), index=torch.Size([3, 1]))
    with pytest.raises(ValueError, match="CRD.*'target'"):
        crd.check_shapes(student=torch.Size([3, 5]), teacher=torch.Size([3, 7]), index=torch.Size([3]),
                         target=torch.Size([3, 10]))
    with pytest.raises(ValueError, match="CRD: the teacher head takes 7"):
        crd.check_shapes(student=torch.Size([3, 5]), teacher=torch.Size([3, 8]), index=torch.Size([3]))
    with pytest.raises(RuntimeError, match="setup"):
        CRDLoss()(torch.zeros(2, 3), torch.zeros(2, 3), torch.arange(2))
    with pytest.raises(RuntimeError, match="target"):
        s, t = _inputs()
        crd(s, t, torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="temperature"):
        CRDLoss(temperature=0)


def test_crd_full_precision_under_autocast():
    crd = _make()
    s, t = _inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = crd(s, t, torch.tensor([0, 1, 2]))
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())
    assert crd.memory_s.dtype == torch.float32


def _crd_rank(rank: int, world: int, init_file: str, folder: str) -> None:
    """One data-parallel rank of the CRD invariant test: its half of each global batch."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = torch.load(f"{folder}/setup.pt")
        crd = _make(ds=6, dt=10, n=32, k=16, target=True)
        crd.load_state_dict(state["crd"])
        torch.manual_seed(1 + rank)  # the ranks' global generators differ (as in a run); CRD's own agree
        losses = []
        for s, t, index, y in state["batches"]:
            share = s.shape[0] // world
            rows = slice(rank * share, (rank + 1) * share)
            crd.on_batch((share,) * world, rank)
            out = crd(s[rows], t[rows], index[rows], y[rows])
            losses.append(torch.stack([out["student_anchor"], out["teacher_anchor"]]).detach())
        torch.save({"losses": torch.stack(losses), "memory_s": crd.memory_s, "memory_t": crd.memory_t,
                    "labels": crd.labels, "z": torch.stack([crd.z_s, crd.z_t])}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_crd_under_two_ranks_keeps_the_bank_and_loss_of_one_process(tmp_path):
    """Issue 16: each rank used to write only its own rows into a rank-local bank (all rows differed between
    ranks, and the partition constant was each rank's own). Now 2 gloo ranks hold the bank, label table and
    constants that one process with the global batch holds, and their mean loss is its loss."""
    crd = _make(ds=6, dt=10, n=32, k=16, target=True)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(8, 6, generator=g), torch.randn(8, 10, generator=g), torch.randperm(32, generator=g)[:8],
                torch.randint(0, 4, (8,), generator=g)) for _ in range(3)]
    torch.save({"crd": crd.state_dict(), "batches": batches}, tmp_path / "setup.pt")
    torch.manual_seed(1)
    single = [crd(s, t, index, y) for s, t, index, y in batches]
    single = torch.stack([torch.stack([o["student_anchor"], o["teacher_anchor"]]).detach() for o in single])
    torch.multiprocessing.spawn(_crd_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key, ref in (("memory_s", crd.memory_s), ("memory_t", crd.memory_t), ("labels", crd.labels),
                     ("z", torch.stack([crd.z_s, crd.z_t]))):
        for r in ranks:
            torch.testing.assert_close(r[key], ref, rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close((ranks[0]["losses"] + ranks[1]["losses"]) / 2, single, rtol=1e-5, atol=1e-6)


def test_crd_negatives_are_distinct_within_a_row_like_the_reference():
    """Issue 17: draws with replacement repeated 14.9% of each row's 16384 negatives out of 50,000; the reference
    draws without replacement whenever a row has K candidates (with replacement only when it has fewer)."""
    n, classes, k = 200, 4, 40
    labels = torch.arange(n) % classes
    crd = CRDLoss(feat_dim=4, num_negatives=k)
    crd.setup(BuildContext(shapes=_shapes(6, 5, 7, target=True), num_train=n, train_labels=labels))
    index, target = torch.tensor([0, 1, 2, 3, 5, 6]), torch.tensor([0, 1, 2, 3, 1, 2])
    neg = crd.sample_indices(index, target)[:, 1:]
    assert all(len(set(row)) == k for row in neg.tolist())  # no repeats
    assert (labels[neg] != target.unsqueeze(1)).all()  # other-class only
    counts = torch.bincount(torch.cat([crd.sample_indices(index, target)[0, 1:] for _ in range(300)]), minlength=n)
    other = counts[labels != 0].float()  # row 0 (class 0) over many draws: uniform over the other classes
    assert other.min() > 0.6 * other.mean() and counts[labels == 0].sum() == 0
    plain = _make(n=n, k=k)  # without targets: distinct from all n
    assert all(len(set(row)) == k for row in plain.sample_indices(torch.tensor([1, 2, 3]))[:, 1:].tolist())
    # rows in chunks of at most ROW_CHUNK keys give the same kind of draw
    crd.ROW_CHUNK = 2 * n
    chunked = crd.sample_indices(index, target)[:, 1:]
    assert chunked.shape == (6, k) and all(len(set(row)) == k for row in chunked.tolist())
    assert (labels[chunked] != target.unsqueeze(1)).all()
