"""HARD (Nix, Burg, Sinz 2023): the affine augmentor, the KD value, the batch it hands the models, the
augmentor's ascent on teacher-student disagreement (gradients reach the augmentor only), and a run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kdrun.component import BuildContext, OuterStep
from kdrun.losses import HARDLoss, KDLoss
from kdrun.losses.hard import AffineAugmentor
from kdrun.models.simple import simple_cnn


def test_the_augmentor_starts_at_the_identity_and_warps_within_its_bound():
    torch.manual_seed(0)
    aug = AffineAugmentor(3, width=8, bound=0.5)
    x = torch.rand(4, 3, 8, 8)
    torch.testing.assert_close(aug(x), x, atol=1e-5, rtol=0)
    with torch.no_grad():
        aug.theta.bias.fill_(10.0)  # saturated: every entry of A moves by the bound
    a = aug.transforms(x)
    torch.testing.assert_close(a, torch.tensor([[1.5, 0.5, 0.5], [0.5, 1.5, 0.5]]).expand(4, 2, 3), atol=1e-4, rtol=0)


def _term(fraction=0.5, label_weight=1.0, lr=1e-3):
    term = HARDLoss(in_channels=3, temperature=2.0, fraction=fraction, label_weight=label_weight, augmentor_lr=lr, width=8)
    term.setup(BuildContext(shapes={}, num_train=8, models={"student": torch.nn.Identity(), "teacher": torch.nn.Identity()},
                            inputs={"student": "student.logits", "teacher": "teacher.logits", "target": "batch.target"}))
    return term


def test_its_value_is_kd():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    torch.testing.assert_close(_term()(s, t, torch.zeros(5, dtype=torch.long)), KDLoss(temperature=2.0)(s, t))


def test_the_models_see_a_share_of_augmented_images_in_training_only():
    torch.manual_seed(0)
    term = _term(fraction=0.5)
    with torch.no_grad():
        term.augmentor.theta.bias.copy_(torch.tensor([0.3, 0.0, 0.2, 0.0, 0.3, -0.1]))
    batch = {"input": torch.rand(64, 3, 8, 8), "target": torch.zeros(64, dtype=torch.long)}
    out = term.transform_batch(batch)["input"]
    warped = term.augmentor(batch["input"]).detach()
    same = (out == batch["input"]).flatten(1).all(1)
    moved = torch.isclose(out, warped).flatten(1).all(1)
    assert bool((same | moved).all()) and 16 < int(moved.sum()) < 48  # each image clean or warped, about half warped
    term.eval()
    assert torch.equal(term.transform_batch(batch)["input"], batch["input"])
    term.train()
    assert torch.equal(_term(fraction=0.0).transform_batch(batch)["input"], batch["input"])


def _step(term, student, teacher, x, y):
    models = {"student": student, "teacher": teacher}

    def forward(batch, names, params=None):
        ns = {f"batch.{k}": v for k, v in batch.items()}
        for n in names:
            m = models[n]
            state = {**{k: b.clone() for k, b in m.named_buffers()}, **(params or {}).get(n, {})}
            ns[f"{n}.logits"] = functional_call(m, state, (batch["input"],))
        return ns

    return OuterStep(batch={"input": x, "target": y}, held_out={}, forward=forward, lr=lambda m: 0.1,
                     reduce_mean=lambda ts: None, params=lambda m: dict(models[m].named_parameters()))


def test_the_augmentor_ascends_the_disagreement_and_touches_no_model_weight():
    torch.manual_seed(0)
    student, teacher = simple_cnn(5, 3, width=4, depth=2), simple_cnn(5, 3, width=8, depth=2).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    term = _term(label_weight=0.0, lr=1e-2)
    with torch.no_grad():
        term.augmentor.theta.bias.normal_(0, 0.3)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,))
    bn = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    step = _step(term, student, teacher, x, y)
    before = float(term.disagreement(step).detach())
    term.outer_step(step)
    assert int(term.adam_steps) == 1
    assert all(p.grad is None for p in student.parameters()) and all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(student.state_dict()[k], v) for k, v in bn.items())  # BatchNorm statistics left alone
    after = float(term.disagreement(step).detach())
    assert after < before  # -KL fell: the teacher and the student disagree more on the new warps
    assert list(term.stage_parameters()) == []


def test_the_augmentor_gradient_is_that_of_its_objective():
    torch.manual_seed(1)
    student, teacher = simple_cnn(5, 3, width=4, depth=2).eval(), simple_cnn(5, 3, width=4, depth=2).eval()
    term = _term(label_weight=0.7)
    with torch.no_grad():
        term.augmentor.theta.bias.normal_(0, 0.3)
    x, y = torch.rand(6, 3, 8, 8), torch.randint(0, 5, (6,))
    loss = term.disagreement(_step(term, student, teacher, x, y))
    got = torch.autograd.grad(loss, list(term.augmentor.parameters()))
    xa = term.augmentor(x)
    s, t = student(xa), teacher(xa)
    p_t = F.softmax(t / 2, 1)
    want_loss = -4 * (p_t * (F.log_softmax(t / 2, 1) - F.log_softmax(s / 2, 1))).sum(1).mean() + 0.7 * F.cross_entropy(t, y)
    want = torch.autograd.grad(want_loss, list(term.augmentor.parameters()))
    assert float(loss.detach()) == pytest.approx(float(want_loss.detach()), rel=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_a_run_step_trains_the_student_and_the_augmentor_apart(tmp_path):
    from kdrun.config import validate
    from kdrun.engine.trainer import Trainer
    from tests.conftest import compose_cfg

    torch.manual_seed(0)
    cfg = validate(compose_cfg(["data=synthetic", "data.num_classes=5", "data.batch_size=8", "data.eval_batch_size=8",
                                "data.source.num_train=16", "data.source.num_test=8", "teacher=resnet8", "student=resnet8",
                                "teacher.checkpoint=null", "trainer.device=cpu", "trainer.progress=off",
                                "trainer.tensorboard=false"], recipe="cifar100_hard"))
    trainer = Trainer(cfg, tmp_path)
    trainer.prepare()
    runner = trainer.stage_runner(0)
    term = trainer.experiment.losses["hard"].module
    aug_ids = {id(p) for p in term.augmentor.parameters()}
    assert not any(id(p) in aug_ids for g in runner.groups for p in g.params)
    before = [p.detach().clone() for p in term.augmentor.parameters()]
    student = [p.detach().clone() for p in trainer.experiment.models["student"].parameters()]
    teacher = [p.detach().clone() for p in trainer.experiment.models["teacher"].parameters()]
    runner.train_step(next(iter(trainer.ctx.train_loader)), runner.term_weights(0))
    assert int(term.adam_steps) == 1 and term.last_disagreement is not None
    assert any(not torch.equal(a, p) for a, p in zip(before, term.augmentor.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(student, trainer.experiment.models["student"].parameters()))
    assert all(torch.equal(a, p) for a, p in zip(teacher, trainer.experiment.models["teacher"].parameters()))
