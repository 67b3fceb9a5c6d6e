"""OFDLoss: partial L2 vs mdistiller's formula, BN margins, online margins, term by loops, state."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses.ofd import OFDConnector, OFDLoss, bn_margin, ofd_partial_l2
from kdrun.component import BuildContext


def _maps(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _mdistiller_feat_loss_by_loops(s, t, m):
    """mdistiller's feat_loss: three cases, mean over the batch, sum over the rest; m per channel."""
    b, c, h, w = s.shape
    total = 0.0
    for i in range(b):
        for ch in range(c):
            mc = m[ch]
            for y in range(h):
                for x in range(w):
                    a, tt = s[i, ch, y, x].item(), t[i, ch, y, x].item()
                    if a > mc and tt <= mc:
                        total += (a - mc) ** 2
                    if a > tt and mc < tt <= 0:
                        total += (a - tt) ** 2
                    if tt > 0:
                        total += (a - tt) ** 2
    return total / b


def test_partial_l2_matches_mdistiller_three_cases():
    s, t = _maps(2, 3, 3, 3, seed=1), _maps(2, 3, 3, 3, seed=2)
    m = [-0.5, -1.0, 0.0]
    got = ofd_partial_l2(s, t, torch.tensor(m).view(1, 3, 1, 1)).sum() / 2
    assert got.item() == pytest.approx(_mdistiller_feat_loss_by_loops(s, t, m), rel=1e-5)
    # by hand: t' = max(t, m) with m = -1
    s1 = torch.tensor([0.5, -3.0, -0.2, -0.8, 2.0])
    t1 = torch.tensor([1.0, -2.0, -2.0, -0.5, -0.5])
    # t' = 1, -1, -1, -0.5, -0.5 ; counted: t' > 0 | s > t'  -> 0.25, 0, 0.64, 0, 6.25
    assert ofd_partial_l2(s1, t1, torch.tensor(-1.0)).tolist() == pytest.approx([0.25, 0.0, 0.64, 0.0, 6.25])
    # zero when the student equals the transformed teacher
    assert ofd_partial_l2(t.clamp(min=-0.5), t, torch.tensor(-0.5)).abs().sum().item() == 0.0


def test_bn_margin_closed_form():
    weight = torch.tensor([1.0, 0.5, -2.0, 0.1])
    bias = torch.tensor([0.0, 1.0, -1.0, 1.0])

    def ref(g, b):
        s, m = abs(g), b
        cdf = 0.5 * (1 + math.erf(-m / s / math.sqrt(2)))
        if cdf > 0.001:
            return -s * math.exp(-((m / s) ** 2) / 2) / math.sqrt(2 * math.pi) / cdf + m
        return -3 * s

    want = [ref(g, b) for g, b in zip(weight.tolist(), bias.tolist())]
    assert bn_margin(weight, bias).tolist() == pytest.approx(want, rel=1e-6)
    assert want[0] == pytest.approx(-math.sqrt(2 / math.pi), rel=1e-9)  # half-normal mean
    assert want[3] == pytest.approx(-0.3, rel=1e-6)  # 10 sigma away: -3 s


def _setup(s, t, **kw):
    torch.manual_seed(0)
    ofd = OFDLoss(**kw)
    shapes = {"student": [x.shape for x in s], "teacher": [x.shape for x in t]}
    ofd.setup(BuildContext(shapes=shapes, num_train=10))
    ofd.check_shapes(**shapes)
    return ofd


def _neg_mean_by_loops(t):
    b, c, h, w = t.shape
    out_sum, out_frac = [], []
    for ch in range(c):
        vals = [t[i, ch, y, x].item() for i in range(b) for y in range(h) for x in range(w)]
        out_sum.append(sum(v for v in vals if v < 0) / len(vals))
        out_frac.append(sum(1 for v in vals if v < 0) / len(vals))
    return out_sum, out_frac


def test_online_margin_is_the_running_expected_negative_response():
    s = [_maps(2, 3, 2, 2, seed=3)]
    t1, t2 = [_maps(2, 4, 2, 2, seed=4)], [_maps(2, 4, 2, 2, seed=5) - 0.5]
    with torch.no_grad():
        t1[0][:, 3] = t1[0][:, 3].abs() + 0.1  # channel 3 never negative
    ofd = _setup(s, t1)
    ofd(s, t1)
    s1, f1 = _neg_mean_by_loops(t1[0])
    want1 = [a / f if f > 0 else 0.0 for a, f in zip(s1, f1)]
    assert ofd.margin(0).tolist() == pytest.approx(want1, rel=1e-5)
    assert want1[3] == 0.0 and all(v < 0 for v in want1[:3])
    ofd(s, t2)
    s2, f2 = _neg_mean_by_loops(t2[0])
    want2 = [((a + b) / 2) / ((f + g) / 2) if f + g > 0 else 0.0 for a, b, f, g in zip(s1, s2, f1, f2)]
    assert ofd.margin(0).tolist() == pytest.approx(want2, rel=1e-5)
    assert ofd.num_batches.item() == 2
    ofd.eval()
    ofd(s, [t1[0] - 3.0])
    assert ofd.margin(0).tolist() == pytest.approx(want2, rel=1e-5)


def test_teacher_bn_margins_are_fixed():
    s, t = [_maps(2, 3, 2, 2, seed=6)], [_maps(2, 4, 2, 2, seed=7)]
    ofd = _setup(s, t)
    bn = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 0.5, 2.0, 0.1]))
        bn.bias.copy_(torch.tensor([0.0, 1.0, -1.0, 1.0]))
    ofd.set_teacher_bn([bn])
    want = bn_margin(bn.weight, bn.bias)
    assert torch.equal(ofd.margin(0), want) and bool(ofd.margin_fixed)
    ofd(s, t)
    ofd(s, [t[0] - 5.0])
    assert torch.equal(ofd.margin(0), want)
    ofd.set_teacher_bn([(bn.weight, bn.bias)])
    with pytest.raises(ValueError, match="OFD: the BatchNorm of stage pair 0"):
        ofd.set_teacher_bn([torch.nn.BatchNorm2d(5)])
    with pytest.raises(ValueError, match="2 BatchNorms for 1 stage pairs"):
        ofd.set_teacher_bn([bn, bn])


def test_term_by_loops_with_pooling_and_stage_weights():
    s = [_maps(2, 3, 4, 4, seed=8), _maps(2, 5, 2, 2, seed=9)]
    t = [_maps(2, 4, 8, 8, seed=10), _maps(2, 6, 2, 2, seed=11)]
    ofd = _setup(s, t)
    bns = []
    for c, seed in ((4, 12), (6, 13)):
        g = torch.Generator().manual_seed(seed)
        bns.append((torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)))
    ofd.set_teacher_bn(bns)
    with torch.no_grad():
        r0, r1 = ofd.connectors[0](s[0]), ofd.connectors[1](s[1])
    want = (0.5 * _mdistiller_feat_loss_by_loops(r0, F.adaptive_avg_pool2d(t[0], 4), ofd.margin(0).tolist())
            + 1.0 * _mdistiller_feat_loss_by_loops(r1, t[1], ofd.margin(1).tolist()))
    assert ofd(s, t).item() == pytest.approx(want, rel=1e-5)
    assert _setup(s, t, stage_weights=[1.0, 0.0]).weights(2) == [1.0, 0.0]


def test_connector_init_and_gradients():
    conn = OFDConnector(3, 8)
    assert conn[0].bias is None and conn[0].kernel_size == (1, 1)
    assert torch.equal(conn[1].weight, torch.ones(8)) and torch.equal(conn[1].bias, torch.zeros(8))
    assert conn[0].weight.std().item() == pytest.approx(math.sqrt(2 / 8), rel=0.5)
    assert OFDConnector(3, 8, kernel_size=3)[0].padding == (1, 1)
    s = [_maps(2, 3, 4, 4, seed=14).requires_grad_(True)]
    t = [_maps(2, 4, 4, 4, seed=15).requires_grad_(True)]
    ofd = _setup(s, t)
    loss = ofd(s, t)
    loss.backward()
    assert t[0].grad is None and s[0].grad.abs().sum() > 0
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ofd.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ofd(s, t).dtype == torch.float32


def test_state_round_trip():
    s, t = [_maps(4, 3, 2, 2, seed=16)], [_maps(4, 4, 2, 2, seed=17)]
    ofd = _setup(s, t)
    ofd(s, t)
    ofd(s, [t[0] + 0.3])
    sd = ofd.state_dict()
    assert {"margin0", "neg_sum0", "neg_frac0", "num_batches", "margin_fixed"} <= set(sd)
    torch.manual_seed(3)
    fresh = OFDLoss()
    fresh.setup(BuildContext(shapes={"student": [s[0].shape], "teacher": [t[0].shape]}, num_train=10))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(s, t), ofd(s, t))  # both update their statistics identically
    for k, v in ofd.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k])


def test_check_shapes():
    ofd = OFDLoss()
    with pytest.raises(ValueError, match="OFD.*batch"):
        ofd.check_shapes(student=[torch.Size([2, 3, 4, 4])], teacher=[torch.Size([3, 3, 4, 4])])
    with pytest.raises(ValueError, match="OFD.*4-D"):
        ofd.check_shapes(student=[torch.Size([2, 3])], teacher=[torch.Size([2, 3])])
    with pytest.raises(ValueError, match="OFD: 1 stage_weights for 2 stage pairs"):
        OFDLoss(stage_weights=[1.0]).check_shapes(student=[torch.Size([2, 3, 4, 4])] * 2, teacher=[torch.Size([2, 3, 4, 4])] * 2)
    ofd = _setup([_maps(2, 3, 2, 2)], [_maps(2, 4, 2, 2)])
    with pytest.raises(ValueError, match="OFD: pair 0 was set up for 3 student and 4 teacher"):
        ofd.check_shapes(student=[torch.Size([2, 3, 2, 2])], teacher=[torch.Size([2, 5, 2, 2])])
    with pytest.raises(RuntimeError, match="setup"):
        OFDLoss()([_maps(2, 3, 2, 2)], [_maps(2, 3, 2, 2)])
    with pytest.raises(RuntimeError, match="setup"):
        OFDLoss().set_teacher_bn([torch.nn.BatchNorm2d(3)])
    with pytest.raises(ValueError, match="kernel_size"):
        OFDLoss(kernel_size=2)


def test_teacher_bn_paths_fix_the_margins_through_the_build_context():
    from kdrun.component import BuildContext

    teacher = torch.nn.Module()
    teacher.layer1 = torch.nn.Sequential(torch.nn.BatchNorm2d(4))
    with torch.no_grad():
        teacher.layer1[0].weight.copy_(torch.tensor([1.0, 2.0, 0.5, 1.0]))
        teacher.layer1[0].bias.copy_(torch.tensor([0.0, -1.0, 1.0, 3.0]))
    shapes = {"student": [torch.Size([2, 3, 4, 4])], "teacher": [torch.Size([2, 4, 4, 4])]}
    ofd = OFDLoss(teacher_bn=["layer1.0"])
    ofd.setup(BuildContext(shapes=shapes, num_train=10, models={"teacher": teacher}))
    assert bool(ofd.margin_fixed)
    torch.testing.assert_close(ofd.margin(0), bn_margin(teacher.layer1[0].weight, teacher.layer1[0].bias))
    with pytest.raises(ValueError, match=r"teacher has no module 'layer1.1'.*Did you mean 'layer1.0'"):
        OFDLoss(teacher_bn=["layer1.1"]).setup(BuildContext(shapes=shapes, num_train=10, models={"teacher": teacher}))


def test_the_ofd_recipe_takes_the_reference_margins_from_the_teachers_batchnorms():
    from kdrun.build import build
    from kdrun.config import validate
    from kdrun.errors import KdrunError
    from tests.conftest import compose_cfg

    base = ["data=synthetic", "data.num_classes=100", "data.batch_size=8", "data.source.num_train=16", "data.source.num_test=8",
            "teacher=resnet8", "student=resnet8", "teacher.checkpoint=null", "trainer.device=cpu"]
    paths = "[layer1.0.bn2,layer2.0.bn2,layer3.0.bn2]"  # resnet8: one block per stage
    exp = build(validate(compose_cfg(base + [f"loss.ofd.teacher_bn={paths}"], recipe="cifar100_ofd")))
    ofd, teacher = exp.losses["ofd"].module, exp.models["teacher"]
    assert bool(ofd.margin_fixed)
    torch.testing.assert_close(ofd.margin(2), bn_margin(teacher.layer3[0].bn2.weight, teacher.layer3[0].bn2.bias))
    with pytest.raises(KdrunError, match=r"loss.ofd: teacher has no module 'layer9.0.bn2'"):
        build(validate(compose_cfg(base + ["loss.ofd.teacher_bn=[layer9.0.bn2,layer2.0.bn2,layer3.0.bn2]"], recipe="cifar100_ofd")))



def test_the_ofd_recipe_default_reads_each_teachers_batchnorms_itself_and_rereads_them_per_stage():
    """Issue 17: the recipe used online margins although the published code takes them from the teacher's
    BatchNorms. Now ``teacher_bn: auto`` (the recipe default) reads the BatchNorm each zoo model declares
    before its pre-ReLU taps (mdistiller's get_bn_before_relu), and a stage start re-reads them."""
    from kdrun.build import build
    from kdrun.component import StageInfo
    from kdrun.config import validate
    from kdrun.errors import KdrunError
    from tests.conftest import compose_cfg

    base = ["data=synthetic", "data.num_classes=100", "data.batch_size=8", "data.source.num_train=16", "data.source.num_test=8",
            "teacher.checkpoint=null", "trainer.device=cpu"]
    for teacher, bns in (("resnet8", lambda m: [m.layer1[0].bn2, m.layer2[0].bn2, m.layer3[0].bn2]),
                         ("vgg8", lambda m: [m.block1[-1], m.block2[-1], m.block3[-1], m.block4[-1]])):
        exp = build(validate(compose_cfg(base + [f"teacher={teacher}", f"student={teacher}"], recipe="cifar100_ofd")))
        ofd, model = exp.losses["ofd"].module, exp.models["teacher"]
        assert bool(ofd.margin_fixed), teacher
        for i, bn in enumerate(bns(model)):
            assert isinstance(bn, torch.nn.BatchNorm2d)
            torch.testing.assert_close(ofd.margin(i), bn_margin(bn.weight, bn.bias))
    with torch.no_grad():  # a teacher trained by an earlier stage: the margins follow at the next stage start
        bn.bias.add_(-1.0)
    before = ofd.margin(3).clone()
    ofd.on_stage_start(StageInfo("main", 0, 0, ("student",), ("teacher",), 1, None))
    torch.testing.assert_close(ofd.margin(3), bn_margin(bn.weight, bn.bias))
    assert not torch.equal(before, ofd.margin(3))
    wrn = build(validate(compose_cfg(base + ["teacher=wrn_16_2", "student=wrn_16_1"], recipe="cifar100_ofd")))
    torch.testing.assert_close(wrn.losses["ofd"].module.margin(2), bn_margin(wrn.models["teacher"].bn1.weight,
                                                                              wrn.models["teacher"].bn1.bias))
    with pytest.raises(KdrunError, match="teacher_bn=auto needs the BatchNorm before 'teacher.stage1_pre'.*teacher_bn=null"):
        build(validate(compose_cfg(base + ["teacher=mobilenetv2", "student=mobilenetv2"], recipe="cifar100_ofd")))
    online = build(validate(compose_cfg(base + ["teacher=mobilenetv2", "student=mobilenetv2", "loss.ofd.teacher_bn=null"],
                                        recipe="cifar100_ofd")))
    assert not bool(online.losses["ofd"].module.margin_fixed)


def _ofd_rank(rank: int, world: int, init_file: str, folder: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        state = torch.load(f"{folder}/setup.pt")
        s, t = state["s"], state["t"]
        ofd = _setup([x[:2] for x in s[0]], [x[:2] for x in t[0]])
        ofd.load_state_dict(state["ofd"])
        losses = []
        for sb, tb in zip(s, t):
            ofd.on_batch((2, 2), rank)
            losses.append(ofd([x[2 * rank:2 * rank + 2] for x in sb], [x[2 * rank:2 * rank + 2] for x in tb]).detach())
        torch.save({"margin": ofd.margin(0), "losses": torch.stack(losses)}, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_online_margins_under_two_ranks_are_one_process_margins(tmp_path):
    """Issue 16: each rank folded only its own shard's statistics into the margins; now the ranks fold the
    global micro-batch's (an all-reduce of size-weighted means) and agree with one process."""
    s = [[_maps(4, 3, 2, 2, seed=10 + k)] for k in range(3)]
    t = [[_maps(4, 4, 2, 2, seed=20 + k) - 0.3 * k] for k in range(3)]
    ofd = _setup(s[0], t[0])
    torch.save({"ofd": ofd.state_dict(), "s": s, "t": t}, tmp_path / "setup.pt")
    single = torch.stack([ofd(sb, tb).detach() for sb, tb in zip(s, t)])
    torch.multiprocessing.spawn(_ofd_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for r in ranks:
        torch.testing.assert_close(r["margin"], ofd.margin(0), rtol=1e-5, atol=1e-6)
    # the losses themselves differ by design: the connectors' BatchNorm normalises each rank's shard with that
    # shard's statistics, as every BatchNorm does under DDP without trainer.sync_batchnorm
    assert torch.isfinite(ranks[0]["losses"]).all() and single.shape == ranks[0]["losses"].shape
