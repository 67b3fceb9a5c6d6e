"""FTLoss: both stages from one instance, factor loss by loops, which modules get gradients, state."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdrun.losses.ft import FTLoss, Paraphraser, Translator
from kdrun.component import BuildContext, StageInfo


def _maps(*shape, seed=0, relu=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x.clamp(min=0) if relu else x


def _setup(s, t, **kw):
    torch.manual_seed(0)
    ft = FTLoss(**kw)
    shapes = {"student": s.shape, "teacher": t.shape}
    ft.setup(BuildContext(shapes=shapes, num_train=10))
    ft.check_shapes(**shapes)
    return ft


def stage(name, trains=True):
    """The StageInfo the engine passes: the init stage trains no model, the main stage the student."""
    return StageInfo(name, 0, 0, ("student",) if trains else (), ("teacher",) if trains else ("student", "teacher"), 1, None)


def _attention_factor_by_loops(f):
    b, c, h, w = f.shape
    out = []
    for i in range(b):
        v = [sum(f[i, ch, y, x].item() ** 2 for ch in range(c)) / c for y in range(h) for x in range(w)]
        n = math.sqrt(sum(u * u for u in v))
        out.append([u / n for u in v])
    return out


def _grads(module):
    return [p.grad for p in module.parameters()]


def test_modules_follow_repdistiller():
    ft = _setup(_maps(2, 6, 4, 4), _maps(2, 8, 4, 4))
    assert isinstance(ft.paraphraser, Paraphraser) and isinstance(ft.translator, Translator)
    enc = [m for m in ft.paraphraser.encoder if isinstance(m, torch.nn.Conv2d)]
    dec = [m for m in ft.paraphraser.decoder if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in enc] == [(8, 8), (8, 4), (4, 4)]
    assert [(m.in_channels, m.out_channels) for m in dec] == [(4, 4), (4, 8), (8, 8)]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ft.paraphraser.modules())
    tr = [m for m in ft.translator.encoder if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in tr] == [(6, 6), (6, 4), (4, 4)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in ft.translator.modules()) == 3


def test_init_stage_trains_only_the_paraphraser():
    s = _maps(2, 6, 4, 4, seed=1).requires_grad_(True)
    t = _maps(2, 8, 4, 4, seed=2).requires_grad_(True)
    ft = _setup(s, t)
    ft.on_stage_start(stage("init", trains=False))
    out = ft(s, t)
    assert set(out) == {"reconstruction"}
    with torch.no_grad():
        rec = ft.paraphraser.decoder(ft.paraphraser.encoder(t))
    assert out["reconstruction"].item() == pytest.approx(F.mse_loss(rec, t).item(), rel=1e-6)
    out["reconstruction"].backward()
    assert t.grad is None and s.grad is None
    assert all(g is not None and g.abs().sum() > 0 for g in _grads(ft.paraphraser))
    assert all(g is None for g in _grads(ft.translator))


def test_main_stage_transfers_factor_by_loops_with_frozen_paraphraser():
    s = _maps(2, 6, 4, 4, seed=3).requires_grad_(True)
    t = _maps(2, 8, 4, 4, seed=4).requires_grad_(True)
    ft = _setup(s, t, beta=200.0)
    ft.on_stage_start(stage("main"))
    out = ft(s, t)
    assert set(out) == {"factor"}
    with torch.no_grad():
        fs = _attention_factor_by_loops(ft.translator(s))
        ftt = _attention_factor_by_loops(ft.paraphraser.encoder(t))
    want = 200.0 * sum(abs(a - b) for ra, rb in zip(fs, ftt) for a, b in zip(ra, rb)) / (2 * 16)
    assert out["factor"].item() == pytest.approx(want, rel=1e-5)
    out["factor"].backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    assert all(g is None for g in _grads(ft.paraphraser))
    assert all(g is not None for g in _grads(ft.translator))


def test_factor_loss_zero_when_student_factor_equals_teacher_factor():
    t = _maps(2, 4, 4, 4, seed=5)
    for factor_map in ("attention", "flat"):
        ft = _setup(t, t, factor_map=factor_map, translator_bn=False, mode="transfer")
        ft.translator.load_state_dict({k: v for k, v in ft.paraphraser.state_dict().items() if k.startswith("encoder")})
        assert ft(t.clone(), t)["factor"].item() == pytest.approx(0.0, abs=1e-6)
        assert ft(t + _maps(2, 4, 4, 4, seed=99), t)["factor"].item() > 1e-3


def test_flat_factor_map_is_the_papers_normalised_factor():
    ft = _setup(_maps(2, 6, 4, 4), _maps(2, 8, 4, 4), factor_map="flat", p2=2.0, beta=1.0, mode="transfer")
    f = _maps(2, 3, 2, 2, seed=6, relu=False)
    want = f.flatten(1) / f.flatten(1).norm(dim=1, keepdim=True)
    assert torch.allclose(ft.factor(f), want, atol=1e-6)
    s, t = _maps(2, 6, 4, 4, seed=7), _maps(2, 8, 4, 4, seed=8)
    with torch.no_grad():
        d = ft.factor(ft.translator(s)) - ft.factor(ft.paraphraser.encoder(t))
    assert ft(s, t)["factor"].item() == pytest.approx(d.pow(2).mean().item(), rel=1e-5)


def test_stage_selection_rules():
    s, t = _maps(2, 6, 4, 4, seed=9), _maps(2, 8, 4, 4, seed=10)
    ft = _setup(s, t)
    with pytest.raises(RuntimeError, match="on_stage_start"):
        ft(s, t)  # no stage announced, gradients on: refuse rather than train the wrong objective
    with torch.no_grad():
        assert set(ft(s, t)) == {"reconstruction", "factor"}  # the builder's trial forward
    ft.on_stage_start(stage("warmup"))
    assert set(ft(s, t)) == {"factor"}
    custom = _setup(s, t, init_stage="paraphrase")
    custom.on_stage_start(stage("paraphrase"))  # by name, although it trains
    assert set(custom(s, t)) == {"reconstruction"}
    pinned = _setup(s, t, mode="paraphraser")
    pinned.on_stage_start(stage("main"))
    assert set(pinned(s, t)) == {"reconstruction"}


def test_spatial_mismatch_pools_the_larger_factor():
    s, t = _maps(2, 6, 8, 8, seed=11), _maps(2, 8, 4, 4, seed=12)
    ft = _setup(s, t, mode="transfer")
    with torch.no_grad():
        fs = F.adaptive_avg_pool2d(ft.translator(s), 4)
        d = ft.factor(fs) - ft.factor(ft.paraphraser.encoder(t))
    assert ft(s, t)["factor"].item() == pytest.approx(200.0 * d.abs().mean().item(), rel=1e-5)


def test_state_round_trip():
    s, t = _maps(4, 6, 4, 4, seed=13), _maps(4, 8, 4, 4, seed=14)
    ft = _setup(s, t)
    ft.on_stage_start(stage("main"))
    ft(s, t)  # moves the translator's BatchNorm statistics
    torch.manual_seed(9)
    fresh = FTLoss()
    fresh.setup(BuildContext(shapes={"student": s.shape, "teacher": t.shape}, num_train=10))
    fresh.load_state_dict(ft.state_dict())
    for info in (stage("init", trains=False), stage("main")):
        ft.on_stage_start(info)
        fresh.on_stage_start(info)
        ft.eval()
        fresh.eval()
        a, b = ft(s, t), fresh(s, t)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_check_shapes():
    ft = FTLoss()
    with pytest.raises(ValueError, match="FT.*batch"):
        ft.check_shapes(student=torch.Size([2, 6, 4, 4]), teacher=torch.Size([3, 8, 4, 4]))
    with pytest.raises(ValueError, match="FT.*height"):
        ft.check_shapes(student=torch.Size([2, 6]), teacher=torch.Size([2, 8]))
    with pytest.raises(ValueError, match="FT: rate 0.1 leaves no factor channel"):
        FTLoss(rate=0.1).check_shapes(student=torch.Size([2, 6, 4, 4]), teacher=torch.Size([2, 8, 4, 4]))
    ft = _setup(_maps(2, 6, 4, 4), _maps(2, 8, 4, 4))
    with pytest.raises(ValueError, match="FT: set up for 6 student and 8 teacher"):
        ft.check_shapes(student=torch.Size([2, 6, 4, 4]), teacher=torch.Size([2, 9, 4, 4]))
    with pytest.raises(ValueError, match="mode"):
        FTLoss(mode="main")
    with pytest.raises(RuntimeError, match="setup"):
        FTLoss(mode="transfer")(_maps(2, 6, 4, 4), _maps(2, 8, 4, 4))


def test_the_init_stage_trains_only_the_paraphraser_with_every_model_frozen_in_eval_mode(tmp_path):
    """RepDistiller's init: model_s.eval(), only the paraphraser learns. kdrun's init stage trains no model
    (train: []), so the student's weights and BatchNorm statistics do not move and it is no random teacher."""
    import copy

    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg

    cfg = validate(compose_cfg(["data=synthetic", "data.num_classes=100", "data.batch_size=8", "data.source.num_train=16",
                                "data.source.num_test=8", "teacher=resnet8", "student=resnet8", "teacher.checkpoint=null",
                                "trainer.progress=off", "trainer.tensorboard=false", "trainer.device=cpu"], recipe="cifar100_ft"))
    trainer = Trainer(cfg, tmp_path)
    exp = trainer.prepare()
    assert [p.name for p in exp.stages] == ["init", "main"] and exp.stages[0].trained_models == []
    assert exp.random_models == ["teacher"]  # the student waits for its stage: not a random teacher
    runner = trainer.stage_runner(0)
    student, ft = exp.models["student"], exp.losses["ft"].module
    assert not student.training and not any(p.requires_grad for p in student.parameters())
    assert ft.mode == "paraphraser" and exp.stages[0].eval_model is None
    before = copy.deepcopy(student.state_dict())
    paraphraser = copy.deepcopy(ft.paraphraser.state_dict())
    runner.train_step(next(iter(trainer.ctx.train_loader)), runner.term_weights(0))
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())  # BatchNorm statistics included
    assert any(not torch.equal(v, paraphraser[k]) for k, v in ft.paraphraser.state_dict().items())
    main = trainer.stage_runner(1)
    assert ft.mode == "transfer" and student.training
    assert main.plan.eval_model == "student"
