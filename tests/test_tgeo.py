"""TGeo-KD (Hu et al., ICLR 2024): the fused objective against a per-sample loop, the relation features,
the hypergradient of the one-step look-ahead against finite differences, the fusion network's own Adam
against torch.optim.Adam, and the engine's meta split and outer steps in a run."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from kdrun.component import BuildContext, OuterStep
from kdrun.errors import KdrunError
from kdrun.losses import TGeoKDLoss
from kdrun.losses.adam import adam_step

C = 4


def _term(hidden: int = 8) -> TGeoKDLoss:
    term = TGeoKDLoss(num_classes=C, temperature=2.0, hidden=hidden).double()
    term.setup(BuildContext(shapes={}, num_train=10, models={"student": torch.nn.Linear(3, C), "teacher": torch.nn.Linear(3, C)},
                            inputs={"student": "student.logits", "teacher": "teacher.logits", "target": "batch.target"}))
    g = torch.Generator().manual_seed(3)
    means = torch.rand(C, C, generator=g, dtype=torch.float64)
    term.set_class_means({"teacher": means / means.sum(1, keepdim=True)})
    for p in term.fusion.parameters():  # away from the zero bias, so that alpha varies by sample
        p.data.normal_(0, 0.5, generator=g)
    return term


def test_the_fused_loss_is_the_per_sample_mixture_of_kd_and_ce():
    term = _term()
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, C, generator=g, dtype=torch.float64), torch.randn(5, C, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1])
    alpha = term.ratio(s, t, y).detach()
    assert alpha.shape == (5,) and float(alpha.min()) > 0 and float(alpha.max()) < 1 and float(alpha.std()) > 0
    want = 0.0
    for i in range(5):
        p_t, log_p_s = F.softmax(t[i] / 2, 0), F.log_softmax(s[i] / 2, 0)
        kd = 4 * float((p_t * (p_t.log() - log_p_s)).sum())
        ce = -float(F.log_softmax(s[i], 0)[y[i]])
        want += float(alpha[i]) * kd + (1 - float(alpha[i])) * ce
    assert float(term(s, t, y)) == pytest.approx(want / 5, rel=1e-10)


def test_the_relation_features_and_that_the_student_step_leaves_the_ratio_alone():
    term = _term()
    s, t, y = torch.randn(3, C, dtype=torch.float64, requires_grad=True), torch.randn(3, C, dtype=torch.float64), torch.tensor([2, 0, 1])
    r = term.features(s, t, y)
    p_s, p_t = F.softmax(s, 1), F.softmax(t, 1)
    g = F.one_hot(y, C).double()
    vecs = [p_s - p_t, p_s - g, p_t - g, p_t - term.class_mean_prediction[y]]
    torch.testing.assert_close(r, torch.cat(vecs + [torch.stack([v.norm(dim=1) for v in vecs], 1)], 1).detach())
    term(s, t, y).backward()
    assert s.grad is not None and all(p.grad is None for p in term.fusion.parameters())
    assert list(term.stage_parameters()) == []  # the stage's optimizer never sees the fusion network


def _linear_step(term, student, x, y, xv, yv, lr):
    teacher = torch.nn.Linear(3, C).double()
    torch.nn.init.normal_(teacher.weight, generator=torch.Generator().manual_seed(9))
    models = {"student": student, "teacher": teacher}

    def forward(batch, names, params=None):
        params = params or {}
        ns = {f"batch.{k}": v for k, v in batch.items()}
        for n in names:
            m = models[n]
            if n in params:
                ns[f"{n}.logits"] = functional_call(m, params[n], (batch["input"],))
            else:
                with torch.no_grad():
                    ns[f"{n}.logits"] = m(batch["input"])
        return ns

    return OuterStep(batch={"input": x, "target": y}, held_out={"input": xv, "target": yv}, forward=forward,
                     lr=lambda m: lr, reduce_mean=lambda ts: None,
                     params=lambda m: dict(models[m].named_parameters()), step=0)


def test_the_look_ahead_hypergradient_matches_finite_differences():
    torch.manual_seed(0)
    term = _term(hidden=5)
    student = torch.nn.Linear(3, C).double()
    g = torch.Generator().manual_seed(1)
    x, xv = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    y, yv = torch.randint(0, C, (6,), generator=g), torch.randint(0, C, (5,), generator=g)
    step = _linear_step(term, student, x, y, xv, yv, lr=0.5)
    grads = term.meta_gradients(step)

    def meta_loss() -> float:  # CE of the student one SGD step ahead, recomputed from scratch
        theta = dict(student.named_parameters())
        s = functional_call(student, theta, (x,))
        with torch.no_grad():
            t = step.forward(step.batch, ["teacher"])["teacher.logits"]
        inner = term.fused(s, t, y, term.ratio(s, t, y))
        gr = torch.autograd.grad(inner, list(theta.values()))
        ahead = {k: p - 0.5 * d for (k, p), d in zip(theta.items(), gr)}
        return float(F.cross_entropy(functional_call(student, ahead, (xv,)), yv).detach())

    params = list(term.fusion.parameters())
    for pi, idx in ((0, (1, 2)), (0, (4, 7)), (1, (3,)), (2, (0, 4)), (3, (0,))):
        p = params[pi]
        eps = 1e-6
        with torch.no_grad():
            p[idx] += eps
        up = meta_loss()
        with torch.no_grad():
            p[idx] -= 2 * eps
        down = meta_loss()
        with torch.no_grad():
            p[idx] += eps
        assert float(grads[pi][idx]) == pytest.approx((up - down) / (2 * eps), rel=1e-4, abs=1e-9)
    assert any(float(gr.abs().sum()) > 0 for gr in grads)


def test_the_fusion_networks_adam_is_torchs_adam():
    term = _term()
    ref = [p.detach().clone().requires_grad_(True) for p in term.fusion.parameters()]
    opt = torch.optim.Adam(ref, lr=1e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in ref]
        for p, gr in zip(ref, grads):
            p.grad = gr.clone()
        opt.step()
        adam_step(term, list(term.fusion.parameters()), grads, term.meta_lr)
    for p, q in zip(term.fusion.parameters(), ref):
        torch.testing.assert_close(p.detach(), q.detach())
    assert int(term.adam_steps) == 3 and "adam_m0" in term.state_dict()


# ------------------------------------------------------------------------------ the engine
def _cfg(extra=()):
    from kdrun.config import validate
    from tests.conftest import compose_cfg

    return validate(compose_cfg(["data=synthetic", "data.num_classes=5", "data.batch_size=8", "data.eval_batch_size=8",
                                 "data.source.num_train=40", "data.source.num_test=8", "data.meta_split=10",
                                 "teacher=resnet8", "student=resnet8", "teacher.checkpoint=null", "trainer.device=cpu",
                                 "trainer.progress=off", "trainer.tensorboard=false", *extra], recipe="cifar100_tgeo"))


def test_the_meta_set_is_held_out_of_training_class_stratified(tmp_path):
    from kdrun.engine.trainer import Trainer

    trainer = Trainer(_cfg(), tmp_path)
    trainer.prepare()
    data = trainer.experiment.data
    assert data.num_train == 30 and data.meta.num_train == 10
    meta = torch.bincount(data.meta.train_labels, minlength=5)
    total = meta + torch.bincount(data.train_labels, minlength=5)
    assert ((meta - total / 4).abs() <= 1).all()  # a quarter of each class, to within one
    seen = {tuple(x.flatten()[:12].tolist()) for x in data.train_images}
    assert not any(tuple(x.flatten()[:12].tolist()) in seen for x in data.meta.train_images)


def test_a_step_moves_the_fusion_network_by_its_outer_step_only(tmp_path):
    from kdrun.engine.trainer import Trainer

    torch.manual_seed(0)
    trainer = Trainer(_cfg(), tmp_path)
    trainer.prepare()
    runner = trainer.stage_runner(0)
    term = trainer.experiment.losses["tgeo"].module
    fusion_ids = {id(p) for p in term.fusion.parameters()}
    assert not any(id(p) in fusion_ids for g in runner.groups for p in g.params)
    before = [p.detach().clone() for p in term.fusion.parameters()]
    student = [p.detach().clone() for p in trainer.experiment.models["student"].parameters()]
    runner.train_step(next(iter(trainer.ctx.train_loader)), runner.term_weights(0))
    assert int(term.adam_steps) == 1 and term.last_meta_loss is not None
    assert any(not torch.equal(a, p) for a, p in zip(before, term.fusion.parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(student, trainer.experiment.models["student"].parameters()))
    # the meta batch of a step is a function of the step: a fresh runner (a resume) draws the same one
    runner.record.stage_step = 7
    a = runner._meta_batch()["index"]
    other = trainer.stage_runner(0)
    other.record.stage_step = 7
    assert torch.equal(other._meta_batch()["index"], a)


def test_a_meta_split_of_token_data_is_refused_by_name():
    from kdrun.build import load_data
    from tests.conftest import compose_cfg

    with pytest.raises(KdrunError, match="data.meta_split works with array data sets"):
        load_data(compose_cfg(["data=synthetic_tokens", "data.meta_split=4"], recipe="synthetic_tokens_kd"))


def test_tgeo_without_a_meta_split_is_refused_with_the_fix(tmp_path):
    from kdrun.engine import run

    with pytest.raises(KdrunError, match="data.meta_split=N"):
        run(_cfg(["data.meta_split=null", "stages.main.epochs=1"]), tmp_path)


def _ddp_rank(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from kdrun.engine.distributed import DistInfo
    from kdrun.engine.trainer import Trainer

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # different global draws per rank, as a real launch seeds them
        trainer = Trainer(_cfg(["trainer.max_epochs=1", "trainer.max_steps_per_epoch=2"]), f"{out}.run",
                          dist=DistInfo(rank, rank, world))
        trainer.prepare()
        runner = trainer.stage_runner(0)
        for i, batch in enumerate(trainer.ctx.train_loader):
            if i == 2:
                break
            runner.train_step(batch, runner.term_weights(0))
            runner.record.stage_step += 1
        term = trainer.experiment.losses["tgeo"].module
        torch.save([int(term.adam_steps)] + [p.detach().clone() for p in term.fusion.parameters()], f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_under_ddp_the_fusion_network_stays_identical_on_every_rank(tmp_path):
    """Each rank looks ahead on its own shard; the meta-gradients are averaged, so the ranks agree."""
    torch.multiprocessing.spawn(_ddp_rank, args=(2, str(tmp_path / "init"), str(tmp_path / "f")), nprocs=2)
    a, b = (torch.load(tmp_path / f"f.{r}", weights_only=True) for r in (0, 1))
    assert a[0] == b[0] == 2  # two outer steps on each rank
    assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
